"""--decode device (data/device_decode.py): which files go to the device as JPEG bytes, the
pixels it gives against the loader's PIL path, corrupt files named or skipped, the batches
of a real image folder, training end to end, and the refusals. On the CPU the device's
decoder is libjpeg-turbo through torchvision; the GPU's (nvJPEG) is tests/test_gpu.py's."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data.device_decode as device_decode
import pretrain_on_ImageNet
from data.datasets import ImageFileDataset, build_dataset
from data.device_decode import DeviceDecoded, EncodedBatch, device_decodable
from data.image_io import ORIENTATION_TAG, CorruptImageError, load_rgb
from data.loading import build_train_val, collate_batch
from data.transforms import build_loading_transform
from tests.test_training import assert_same_weights, expect_error
from utils import load_state_dict_safely, run_cli

CPU = torch.device("cpu")


def photo(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A smooth random image with some texture (JPEG-like content)."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((width, height), Image.BILINEAR)
    noise = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return Image.blend(field, noise, 0.15).convert(mode)


def jpeg_bytes(image: Image.Image, **save) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90, **save)
    return out.getvalue()


def turned(image: Image.Image, orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    return jpeg_bytes(image, exif=exif.tobytes())


def write_folder(root: Path, per_class: int = 10) -> dict[str, Path]:
    """Two class folders of JPEGs of several sizes, plus one file of each kind that the
    device does not decode; returns those files by kind."""
    for label, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{i:02d}.jpg").write_bytes(jpeg_bytes(photo(40 + 7 * i, 60 - 3 * i, 10 * label + i)))
    special = {"png": root / "cat" / "p.png", "grey": root / "dog" / "g.jpg", "cmyk": root / "cat" / "c.jpg",
               "turned": root / "dog" / "t.jpg", "progressive": root / "cat" / "q.jpg"}
    photo(50, 30, 90).save(special["png"])
    special["grey"].write_bytes(jpeg_bytes(photo(45, 35, 91, "L")))
    special["cmyk"].write_bytes(jpeg_bytes(photo(33, 44, 92, "CMYK")))
    special["turned"].write_bytes(turned(photo(48, 24, 93)))
    special["progressive"].write_bytes(jpeg_bytes(photo(52, 41, 94), progressive=True))
    return special


def test_what_goes_to_the_device_as_jpeg_bytes(tmp_path):
    special = write_folder(tmp_path)
    plain = jpeg_bytes(photo(30, 20, 0))
    assert device_decodable(plain)
    assert device_decodable(special["grey"].read_bytes()) and device_decodable(special["progressive"].read_bytes())
    assert device_decodable(turned(photo(30, 20, 0), orientation=1))  # upright: nothing to turn
    for kind in ("png", "cmyk", "turned"):
        assert not device_decodable(special[kind].read_bytes()), kind
    assert not device_decodable(plain[: len(plain) // 2])  # a truncated download
    assert not device_decodable(plain + b"trailing bytes")  # no end marker at the end: load_rgb decides
    assert not device_decodable(b"") and not device_decodable(b"\xff\xd8\xff\xd9")  # markers, no image


def test_samples_are_bytes_or_the_loaders_pixels(tmp_path):
    special = write_folder(tmp_path, per_class=2)
    everything = sorted(build_dataset("imagefolder", str(tmp_path), "train", None, False, 0).samples
                        + build_dataset("imagefolder", str(tmp_path), "val", None, False, 0).samples)
    dataset = DeviceDecoded(ImageFileDataset(everything, ["cat", "dog"]), 16)
    kinds = {Path(path): kind for kind, path in special.items()}
    for index, (path, label) in enumerate(dataset.samples):
        item, got_label, got_path = dataset[index]
        assert (got_label, got_path) == (label, path)
        if Path(path).suffix == ".jpg" and kinds.get(Path(path)) not in ("cmyk", "turned"):
            assert item.dim() == 1 and bytes(item.numpy()) == Path(path).read_bytes()
        else:  # decoded while loading, as --decode loader does (CMYK converted, the photograph turned upright)
            expected = torch.from_numpy(np.array(load_rgb(path))).permute(2, 0, 1)
            assert torch.equal(item, expected)
    item = dataset[[p for p, _ in dataset.samples].index(str(special["turned"]))][0]
    assert item.shape == (3, 48, 24)  # upright: the 48 x 24 photograph stored sideways


def test_device_pixels_match_the_loaders_to_one_level(tmp_path):
    """On the CPU the JPEGs decode to PIL's pixels exactly (both libjpeg-turbo); the resize
    on tensors rounds differently from PIL's by at most one level, in a few per cent of the
    values."""
    write_folder(tmp_path)
    for size in (16, 64):
        loader = build_dataset("imagefolder", str(tmp_path), "train", build_loading_transform(size), False, 0)
        device = DeviceDecoded(build_dataset("imagefolder", str(tmp_path), "train", None, False, 0), size)
        batch, labels, dropped = device.collate([device[i] for i in range(len(device))])
        expected, expected_labels, _ = collate_batch([loader[i] for i in range(len(loader))])
        assert isinstance(batch, EncodedBatch) and dropped == 0 and torch.equal(labels, expected_labels)
        images = batch.decode(CPU)
        assert images.dtype == torch.uint8 and images.shape == expected.shape == (len(device), 3, size, size)
        difference = (images.int() - expected.int()).abs()
        assert difference.max() <= 1 and difference.float().mean() < 0.1, (difference.max(), difference.float().mean())
    for image in (photo(37, 23, 1), photo(300, 200, 2), photo(64, 48, 3, "L")):  # decoded: PIL's pixels exactly
        encoded = jpeg_bytes(image)
        decoded = device_decode.decode_jpegs([torch.frombuffer(bytearray(encoded), dtype=torch.uint8)], CPU,
                                             ["x.jpg"])[0]
        pil = np.array(Image.open(io.BytesIO(encoded)).convert("RGB"))
        assert torch.equal(decoded, torch.from_numpy(pil).permute(2, 0, 1))


def test_corrupt_files_are_named_or_skipped(tmp_path):
    write_folder(tmp_path, per_class=4)
    bad = tmp_path / "cat" / "bad.jpg"
    bad.write_bytes(jpeg_bytes(photo(40, 40, 5))[:300])
    samples = [(str(bad), 0), (str(tmp_path / "cat" / "00.jpg"), 0)]
    strict = DeviceDecoded(ImageFileDataset(samples, ["cat"]), 16)
    with pytest.raises(CorruptImageError, match="bad.jpg"):
        strict[0]
    lenient = DeviceDecoded(ImageFileDataset(samples, ["cat"], skip_corrupt=True), 16)
    assert lenient[0] is None
    batch, labels, dropped = lenient.collate([lenient[0], lenient[1]])
    assert dropped == 1 and len(batch) == 1 and labels.tolist() == [0]
    images, labels, dropped = lenient.collate([lenient[0]])
    assert dropped == 1 and len(images) == 0 and len(labels) == 0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision 0.29's, of the decoder called here
def test_a_jpeg_the_decoder_refuses_is_decoded_by_pil(monkeypatch, tmp_path):
    """nvJPEG can refuse data whose header passed (a JPEG feature it lacks, or damage): the
    batch is decoded image by image, the refused one by PIL on the CPU; a file PIL cannot
    decode either is named."""
    import torchvision.io

    real = torchvision.io.decode_jpeg
    paths = {name: tmp_path / f"{name}.jpg" for name in ("good", "odd")}
    for seed, path in enumerate(paths.values()):
        path.write_bytes(jpeg_bytes(photo(20 + seed, 20, seed)))
    good, odd = (torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8) for path in paths.values())
    calls = []

    def refusing(data, **kwargs):
        calls.append(len(data) if isinstance(data, list) else 1)
        if isinstance(data, list) or data is odd:
            raise RuntimeError("nvjpeg: unsupported")
        return real(data, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", refusing)
    images = device_decode.decode_jpegs([good, odd], CPU, [str(paths["good"]), str(paths["odd"])])
    assert calls == [2, 1, 1]
    assert torch.equal(images[0], real(good))
    assert torch.equal(images[1], torch.from_numpy(np.array(load_rgb(paths["odd"]))).permute(2, 0, 1))
    paths["odd"].write_bytes(b"\xff\xd8 damaged")  # PIL cannot decode the file either
    with pytest.raises(CorruptImageError, match="odd.jpg.*PIL fails too.*--decode loader"):
        device_decode.decode_jpegs([good, odd], CPU, [str(paths["good"]), str(paths["odd"])])


def test_batches_decoded_ahead_in_a_thread_are_the_batches_decoded_in_the_step(tmp_path):
    """On a GPU the loader's batches are decoded two ahead in a background thread (the
    decoder holds its caller until done): the same batches as decoding each when taken, a
    load failure passed on as data, a decoding error raised where its batch is taken."""
    from data.device_decode import DecodedAhead, decoding_ahead
    from data.loading import EpochSampler, LoadFailure, make_loader

    write_folder(tmp_path)
    dataset = DeviceDecoded(build_dataset("imagefolder", str(tmp_path), "train", None, False, 0), 16)
    loader = make_loader(dataset, EpochSampler(len(dataset), seed=0), None, batch_size=4, workers=0,
                         generator=torch.Generator(), pin_memory=False)
    inline = [(batch.decode(CPU), labels, dropped) for batch, labels, dropped in loader]
    ahead = list(DecodedAhead(loader, CPU))
    assert len(ahead) == len(inline) == len(DecodedAhead(loader, CPU)) == 6
    for (images, labels, dropped), (expected, expected_labels, expected_dropped) in zip(ahead, inline):
        assert torch.equal(images, expected) and torch.equal(labels, expected_labels) and dropped == expected_dropped
    failure = LoadFailure("x.jpg: corrupt")
    assert list(DecodedAhead([failure], CPU)) == [failure]
    broken = EncodedBatch([torch.frombuffer(bytearray(b"\xff\xd8 not a jpeg \xff\xd9"), dtype=torch.uint8)], 16,
                          [str(tmp_path / "missing.jpg")])
    with pytest.raises(CorruptImageError, match="missing.jpg"):
        list(DecodedAhead([(broken, torch.tensor([0]), 0)], CPU))
    assert decoding_ahead(loader, dataset, CPU) is loader  # on the CPU: decoded in the step
    assert isinstance(decoding_ahead(loader, dataset, torch.device("cuda")), DecodedAhead)
    assert decoding_ahead(loader, dataset.dataset, torch.device("cuda")) is loader  # not --decode device


def test_build_train_val_with_device_decoding(tmp_path):
    write_folder(tmp_path)
    train, val, size, augment = build_train_val("imagefolder", str(tmp_path), 24, 0.0, False, 0, decode="device")
    assert isinstance(train, DeviceDecoded) and isinstance(val, DeviceDecoded) and size == 24
    assert augment is not None and len(train) + len(val) == 25
    with pytest.raises(Exception, match="--augment pil"):
        build_train_val("imagefolder", str(tmp_path), 24, 0.0, False, 0, augment="pil", decode="device")
    with pytest.raises(Exception, match="--decode device.*synthetic"):
        build_train_val("synthetic:classes=2,n=4,n_val=2,size=8", None, 8, 0.0, False, 0, decode="device")


def run_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--dataset", "imagefolder", "--data_dir", str(data), "--arch", "resnet20", "--img_size", "16",
            "--batch_size", "8", "--max_epoch", "2", "--device", "cpu", "-r", str(out / "r.pth"),
            "-a", str(out / "a.pth"), *extra]


def test_training_with_device_decoding_end_to_end(tmp_path, capsys):
    """pretrain_on_ImageNet.py --decode device: reproducible with any number of loading
    processes, close to --decode loader (the same images to a level), nothing cached."""
    data = tmp_path / "data"
    write_folder(data)
    weights = {}
    for name, extra in {"device": ["--decode", "device"], "device_workers": ["--decode", "device", "--workers", "2"],
                        "loader": ["--cache", "off"]}.items():
        out = tmp_path / name
        out.mkdir()
        assert run_cli(pretrain_on_ImageNet.main, run_args(data, out, *extra)) == 0
        weights[name] = load_state_dict_safely(out / "a.pth")
        said = capsys.readouterr().out
        assert "holding the" not in said  # nothing cached
    assert_same_weights(weights["device"], weights["device_workers"])
    different = [k for k in weights["device"] if not torch.equal(weights["device"][k], weights["loader"][k])]
    assert different  # the resize rounds differently: not the same run
    start = load_state_dict_safely(tmp_path / "device" / "r.pth")
    assert_same_weights(start, load_state_dict_safely(tmp_path / "loader" / "r.pth"))

    def distance(x: dict, y: dict) -> float:
        return sum(float((x[k].double() - y[k].double()).norm() ** 2) for k in x if x[k].is_floating_point()) ** 0.5

    # the two runs part a little: much less than either moved from where both started
    apart, moved = distance(weights["device"], weights["loader"]), distance(weights["loader"], start)
    assert apart < 0.25 * moved, (apart, moved)  # measured: 0.16 (0.38 with the colour channels swapped)


def test_device_decoding_refusals(tmp_path, capsys):
    data = tmp_path / "data"
    write_folder(data, per_class=4)
    out = tmp_path / "out"
    out.mkdir()
    for flags, needle in [(["--cache", "on"], "--cache on"), (["--cache", "disk"], "--cache disk"),
                          (["--augment", "pil"], "--augment pil")]:
        expect_error(capsys, pretrain_on_ImageNet.main, run_args(data, out, "--decode", "device", *flags), needle)
    assert list(out.iterdir()) == []
    synthetic = run_args(data, out, "--decode", "device")
    synthetic[1] = "synthetic:classes=2,n=4,n_val=2,size=8"
    expect_error(capsys, pretrain_on_ImageNet.main, synthetic, "--decode device", "synthetic")
    assert list(out.iterdir()) == []


def test_a_run_resumes_with_the_same_decoding_only(tmp_path, capsys):
    data = tmp_path / "data"
    write_folder(data, per_class=4)
    out = tmp_path / "out"
    out.mkdir()
    assert run_cli(pretrain_on_ImageNet.main, run_args(data, out, "--decode", "device")) == 0
    expect_error(capsys, pretrain_on_ImageNet.main,
                 run_args(data, out, "--resume", str(out / "a.last.pth")),
                 "--decode device", "not loader")


def test_device_decoding_under_torchrun_with_a_corrupt_file(tmp_path):
    """Two gloo processes, --decode device --skip_corrupt, a truncated JPEG in the folder:
    the run finishes, counts the skipped file once, and only the first process writes."""
    from tests.test_training import torchrun_nodes

    data = tmp_path / "data"
    write_folder(data)
    (data / "dog" / "zz_truncated.jpg").write_bytes(jpeg_bytes(photo(40, 40, 7))[:400])
    out = tmp_path / "out"
    out.mkdir()
    said = torchrun_nodes(1, ["pretrain_on_ImageNet.py", *run_args(data, out, "--decode", "device", "--skip_corrupt",
                                                                   "--workers", "1")])
    assert said.count("epoch 2/2") == 1, said
    assert "corrupt image" in said, said
    assert {p.name for p in out.iterdir()} == {"r.pth", "a.pth", "a.last.pth", "a.log.jsonl"}
