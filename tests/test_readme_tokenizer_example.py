"""The README's "Write a new modality tokenizer" example runs as written and passes the kit."""

import re
import sys
import types
from pathlib import Path

import numpy as np

from maskloom import tables
from maskloom.tokenizers import TOKENIZERS

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks(section: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 3)
    return re.findall(r"```python\n(.*?)```", text[start : end if end > 0 else None], re.S)


def test_readme_dna_tokenizer(tmp_path, monkeypatch):
    blocks = _python_blocks("Write a new modality tokenizer")
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType("readme_dna_example")  # a real module, so the tokenizer pickles (Ray ships it)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    ns = module.__dict__
    if "dna" in TOKENIZERS:  # a previous run in this process registered it
        TOKENIZERS._items.pop("dna")
    exec(compile(blocks[0], "README-example-1", "exec"), ns)
    exec(compile(blocks[1], "README-example-2", "exec"), ns)
    tok = ns["DnaTokenizer"]()
    recs = tok("genes.fa")
    assert [r.id for r in recs] == ["genes.fa#g1-0", "genes.fa#g2-0"]
    assert recs[0].tokens.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 3, 3, 2, 0]
    assert tok.detokenize(recs[1]) == "NNAC"
    small = ns["DnaTokenizer"]({"max_length": 5})
    assert [r.positions[0, 0] for r in small("genes.fa")] == [0.0, 5.0, 10.0, 0.0]
    t = tables.write_table(str(tmp_path / "table"), recs, tok)
    assert t.num_rows == 2 and np.array_equal(t.records()[1].tokens, recs[1].tokens)
