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
    assert {"image", "video", "audio", "point_cloud", "graph", "time_series", "text"} <= set(
        TOKENIZERS.names()
    )


def test_entry_point_plugins(tmp_path, monkeypatch):
    """Another package adds a modality through the `maskloom.tokenizers` entry-point group."""
    from importlib import metadata

    from maskloom.tokenizers import base

    (tmp_path / "plugin_mod.py").write_text(
        "from dataclasses import dataclass\n"
        "from maskloom.tokenizers.base import Tokenizer\n"
        "class Spectra(Tokenizer):\n"
        "    @dataclass(frozen=True, kw_only=True)\n"
        "    class Config:\n"
        "        width: int = 4\n"
        "        '''samples per token'''\n"
        "    def spec(self): ...\n"
        "    def read(self, source): ...\n"
        "    def tokenize(self, raw, *, source=''): ...\n"
        "    def detokenize(self, record): ...\n"
        "class NotATokenizer: ...\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [
        metadata.EntryPoint(name="spectra", value="plugin_mod:Spectra", group="maskloom.tokenizers"),
        metadata.EntryPoint(name="broken", value="plugin_mod:Missing", group="maskloom.tokenizers"),
        metadata.EntryPoint(name="wrong", value="plugin_mod:NotATokenizer", group="maskloom.tokenizers"),
        metadata.EntryPoint(name="image", value="plugin_mod:Spectra", group="maskloom.tokenizers"),
    ]
    monkeypatch.setattr(
        base.metadata, "entry_points", lambda group: eps if group == "maskloom.tokenizers" else []
    )
    reg = Registry("tokenizer", loader=base._load_entry_points, lazy={"image": "maskloom.tokenizers.image"})
    cls = reg.get("spectra")
    assert cls.__name__ == "Spectra" and cls.name == "spectra" and cls().config.width == 4
    assert reg.names() == ["image", "spectra"]  # the broken and wrong plug-ins are skipped with a warning
    assert "image" not in reg._items  # a plug-in cannot take a built-in's name (the built-in loads lazily)


def test_parts_of_a_file_are_named_and_parsed_back():
    """An input that is part of a file (Tokenizer.split_input): ``path#part:a:b/n``, parsed back
    exactly; any other name, even one holding the separator, is a whole file."""
    import pytest

    from maskloom.tokenizers.base import Tokenizer, make_part, split_part

    assert make_part("/d/train.parquet", 8, 16, 40) == "/d/train.parquet#part:8:16/40"
    assert split_part("/d/train.parquet#part:8:16/40") == ("/d/train.parquet", (8, 16, 40))
    assert split_part("/d/a#part:1:2/3#part:0:1/2") == ("/d/a#part:1:2/3", (0, 1, 2))
    for whole in ("/d/train.parquet", "/d/x#part:", "/d/x#part:2:1/3", "/d/x#part:0:4/3", "/d/x#part:a:b/c",
                  "/d/x#part:01:2/3", "/d/x#part:0:1/2/3"):  # fmt: skip
        assert split_part(whole) == (whole, None)
    for bad in ((2, 2, 3), (-1, 1, 3), (0, 4, 3)):
        with pytest.raises(ValueError):
            make_part("/d/x", *bad)
    assert Tokenizer.split_input(None, "/d/x.parquet") is None  # type: ignore[arg-type]  # the default: whole
