import pytest

from maskloom.registry import Registry, RegistryError
from maskloom.tokenizers import TOKENIZERS


def test_register_and_get():
    reg = Registry[int]("number")
    reg.add("one", 1)
    assert reg.get("one") == 1
    assert "one" in reg and "two" not in reg
    assert reg.names() == ["one"] and len(reg) == 1


def test_duplicate_name_refused():
    reg = Registry[type]("shape")

    @reg.register("square")
    class Square: ...

    with pytest.raises(RegistryError, match="shape 'square' is already registered"):

        @reg.register("square")
        class Other: ...

    assert reg.get("square") is Square


def test_unknown_name_lists_known():
    reg = Registry[int]("colour")
    reg.add("red", 1)
    reg.add("blue", 2)
    with pytest.raises(RegistryError, match=r"unknown colour 'green'; known: blue, red"):
        reg.get("green")


def test_builtin_modalities_registered():
    assert {"image", "video", "audio", "point_cloud", "graph", "time_series", "text"} <= set(TOKENIZERS.names())
