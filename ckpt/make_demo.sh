#!/usr/bin/env bash
# Regenerates the demo checkpoints in ckpt/ (about 6 minutes on a 2-core CPU):
# a CIFAR-style ResNet-20 pre-trained on the synthetic source task, then fine-tuned on two
# synthetic target tasks that differ only in their domain gap (0.0 and 1.0).
set -euo pipefail
cd "$(dirname "$0")/.."
python pretrain_on_ImageNet.py --dataset synthetic:source,classes=100,n=100,n_val=10 --arch resnet20 \
    --max_epoch 20 --batch_size 128 --lr 0.1 --lr_step 8 --seed 0 --overwrite \
    -r ckpt/demo_random_init.pth -a ckpt/demo_pretrained.pth
for gap in 0.0 1.0; do
    python finetune.py --dataset "synthetic:classes=10,n=100,gap=$gap,seed=1" --max_epoch 30 --seed 0 --overwrite \
        -a ckpt/demo_pretrained.pth -b "ckpt/demo_finetuned_gap$gap.pth"
done
python cal_transferability.py
