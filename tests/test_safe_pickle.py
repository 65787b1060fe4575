"""safe_load refuses code, reads dataset pickles; iter_pickled_bytes streams PNG payloads."""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import subprocess

import numpy as np
import pytest
from PIL import Image

from mtl.data.safe_pickle import iter_pickled_bytes, safe_load
from mtl.errors import DataError


# --------------------------------------------------------------------------- Python 2 pickles
# No Python 2 here, so emit what cPickle.dump(obj, f, 2) wrote for numpy 1.x arrays by hand:
# GLOBAL 'numpy.core.multiarray _reconstruct', py2 `str` as (SHORT_)BINSTRING, dtype args as ints.

def _py2_str(data: bytes) -> bytes:
    if len(data) < 256:
        return b"U" + bytes([len(data)]) + data
    return b"T" + struct.pack("<i", len(data)) + data


def _py2_int(n: int) -> bytes:
    return b"K" + bytes([n]) if 0 <= n < 256 else b"J" + struct.pack("<i", n)


def _py2_obj(obj) -> bytes:
    if isinstance(obj, str):
        return _py2_str(obj.encode("latin-1"))
    if isinstance(obj, bytes):
        return _py2_str(obj)
    if isinstance(obj, int):
        return _py2_int(obj)
    if isinstance(obj, list):
        return b"](" + b"".join(_py2_obj(x) for x in obj) + b"e"
    if isinstance(obj, dict):
        return b"}(" + b"".join(_py2_obj(k) + _py2_obj(v) for k, v in obj.items()) + b"u"
    if isinstance(obj, np.ndarray):
        shape = b"(" + b"".join(_py2_int(n) for n in obj.shape) + b"t"
        dtype = (b"cnumpy\ndtype\n" + _py2_str(obj.dtype.str[1:].encode()) + b"K\x00K\x01\x87R"
                 + b"(K\x03" + _py2_str(obj.dtype.str[:1].encode()) + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
        return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
                + b"(K\x01" + shape + dtype + b"\x89" + _py2_str(np.ascontiguousarray(obj).tobytes()) + b"tb")
    raise TypeError(type(obj))


def py2_dumps(obj) -> bytes:
    return b"\x80\x02" + _py2_obj(obj) + b"."


# --------------------------------------------------------------------------- safe_load

def test_loads_python2_miniimagenet_cache(tmp_path):
    rng = np.random.default_rng(0)
    image_data = rng.integers(0, 256, (6, 84, 84, 3), dtype=np.uint8)
    cache = {"image_data": image_data, "class_dict": {"n01532829": [0, 1, 2], "n01558993": [3, 4, 5]}}
    path = tmp_path / "mini-imagenet-cache-train.pkl"
    path.write_bytes(py2_dumps(cache))

    loaded = safe_load(path)

    assert loaded["class_dict"] == cache["class_dict"]
    assert loaded["image_data"].dtype == np.uint8
    np.testing.assert_array_equal(loaded["image_data"], image_data)


def test_loads_python2_cifar_with_byte_keys(tmp_path):
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    path = tmp_path / "train"
    path.write_bytes(py2_dumps({b"data": data, b"fine_labels": [3, 99], b"filenames": [b"a.png", b"b.png"]}))

    loaded = safe_load(path, encoding="bytes")

    assert loaded[b"fine_labels"] == [3, 99]
    assert loaded[b"filenames"] == [b"a.png", b"b.png"]
    np.testing.assert_array_equal(loaded[b"data"], data)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_loads_python3_pickles_of_allowed_types(protocol):
    obj = collections.OrderedDict(
        a=np.arange(12, dtype=np.float32).reshape(3, 4), b=[1, 2.5, True, None, b"x\x89", "s"],
        c=(np.int64(7), np.float32(1.5)), d={1, 2}, e=complex(1, 2),
    )
    loaded = safe_load(io.BytesIO(pickle.dumps(obj, protocol=protocol)))
    assert type(loaded) is collections.OrderedDict
    np.testing.assert_array_equal(loaded["a"], obj["a"])
    assert loaded["b"] == obj["b"] and loaded["c"] == obj["c"] and loaded["d"] == obj["d"] and loaded["e"] == obj["e"]


class _Exploit:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("protocol", [0, 2, 5])
@pytest.mark.parametrize("attack", ["os.system", "subprocess.call", "eval"])
def test_refuses_code_execution_and_runs_nothing(tmp_path, attack, protocol):
    marker = tmp_path / "pwned"
    func, args, refused = {
        "os.system": (os.system, (f"touch {marker}",), "system"),
        "subprocess.call": (subprocess.call, (["touch", str(marker)],), "subprocess.call"),
        "eval": (eval, (f"open({str(marker)!r}, 'w')",), "builtins.eval"),
    }[attack]
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"image_data": [_Exploit(func, args)]}, protocol=protocol))

    with pytest.raises(DataError) as info:
        safe_load(path)

    message = str(info.value)
    assert str(path) in message and refused in message and "malicious" in message
    assert not marker.exists()


def test_refuses_python2_builtin_names(tmp_path):
    path = tmp_path / "evil2.pkl"
    path.write_bytes(b"\x80\x02c__builtin__\neval\nU\x041+1\x85R.")
    with pytest.raises(DataError, match=r"__builtin__\.eval"):
        safe_load(path)


def test_codecs_encode_only_for_latin1(tmp_path):
    path = tmp_path / "codec.pkl"
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(DataError, match=str(path)):
        safe_load(path)


def test_truncated_pickle_names_the_file(tmp_path):
    path = tmp_path / "cut.pkl"
    path.write_bytes(pickle.dumps({"image_data": np.zeros((4, 8, 8, 3), np.uint8)}, protocol=2)[:150])
    with pytest.raises(DataError, match="truncated") as info:
        safe_load(path)
    assert str(path) in str(info.value)


def test_missing_pickle_names_the_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        safe_load(tmp_path / "absent.pkl")


# --------------------------------------------------------------------------- iter_pickled_bytes

def _png_images():
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (h, h, 3), dtype=np.uint8) for h in (2, 5, 40, 3)]
    payloads = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        payloads.append(np.frombuffer(buffer.getvalue(), dtype=np.uint8))
    # sizes span the short (< 256 bytes) and long string opcodes
    assert min(map(len, payloads)) < 256 < max(map(len, payloads))
    return images, payloads


def _decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


@pytest.mark.parametrize("writer", ["py3-protocol0", "py3-protocol2", "py3-protocol4", "py3-protocol5", "py2-protocol2"])
def test_iter_pickled_bytes_yields_pngs_in_order(tmp_path, writer):
    images, payloads = _png_images()
    path = tmp_path / "train_images_png.pkl"
    if writer == "py2-protocol2":
        path.write_bytes(py2_dumps(payloads))
    else:
        path.write_bytes(pickle.dumps(payloads, protocol=int(writer[-1])))

    found = list(iter_pickled_bytes(path))

    assert len(found) == len(images)
    assert all(isinstance(png, bytes) for png in found)
    for png, image in zip(found, images):
        np.testing.assert_array_equal(_decode(png), image)


def test_iter_pickled_bytes_reports_truncation(tmp_path):
    _, payloads = _png_images()
    path = tmp_path / "cut_images_png.pkl"
    path.write_bytes(pickle.dumps(payloads, protocol=2)[:-300])
    with pytest.raises(DataError, match="truncated") as info:
        list(iter_pickled_bytes(path))
    assert str(path) in str(info.value)
