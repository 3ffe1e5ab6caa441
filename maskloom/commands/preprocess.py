"""`maskloom preprocess`: raw files -> a sharded token table (Ray Data; embedded or on a cluster)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from maskloom.pipelines.preprocess import PreprocessResult

log = logging.getLogger(__name__)

HELP = "raw files -> a sharded token table (Ray; resumable, exactly-once; --address for a cluster)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs",
        nargs="+",
        help="input directories, files or glob patterns (or manifests with --manifest); WebDataset tar "
        "shards (.tar, .tar.gz, .tgz) of images, video, audio or point clouds are inputs of many samples; "
        "text and time series read .gz/.bz2/.xz/.zst/.lz4 files as they are",
    )
    parser.add_argument(
        "-m", "--modality", required=True, help="registered tokenizer name (image, audio, ...)"
    )
    parser.add_argument("-o", "--out", required=True, help="output token-table directory")
    g = parser.add_argument_group("tokenizer config")
    g.add_argument("--config", metavar="FILE", help="tokenizer config file (.json, .toml or .yaml)")
    g.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override one config field (VALUE parsed as JSON, else a string); repeatable")  # fmt: skip
    g.add_argument("--import", dest="imports", metavar="MODULE", action="append", default=[],
                   help="import MODULE first (on the driver and every worker), e.g. a plug-in tokenizer")  # fmt: skip
    s = parser.add_argument_group("inputs and labels")
    s.add_argument(
        "--manifest", action="store_true", help="INPUTS are CSV/JSONL manifests with 'path' (+ 'label')"
    )
    s.add_argument("--labels", choices=("auto", "none", "folder", "regex", "manifest"), default="auto",
                   help="label source: parent folder name, --label-regex on file names, the manifest column, "
                   "or none (labels inside dataset files); auto = manifest column if any, else none")  # fmt: skip
    s.add_argument(
        "--label-regex", metavar="REGEX", help="regex with a named group 'label', e.g. '^(?P<label>\\d+)_'"
    )
    s.add_argument(
        "--as-one-source", action="store_true", help="take each input path (even a folder) as one source"
    )
    r = parser.add_argument_group("execution")
    r.add_argument(
        "--address", help="Ray cluster address (default: $RAY_ADDRESS, else an embedded local Ray)"
    )
    r.add_argument(
        "--num-workers",
        type=int,
        help="tokenizer actors (default: CPUs / cpus-per-worker); 0: in this process without Ray "
        "(small jobs, debugging a tokenizer)",
    )
    r.add_argument("--cpus-per-worker", type=float, help="CPUs per actor (default 1)")
    r.add_argument("--gpus-per-worker", type=float, help="GPUs per actor (default 0)")
    r.add_argument("--object-store-memory", type=int, metavar="BYTES", help="object store of an embedded Ray")
    r.add_argument(
        "--shard-size",
        type=int,
        default=None,
        help="inputs per shard (default: ~0.5 s of work each as measured on a few inputs, 32 to 4096 "
        "inputs, and about 8 shards per worker for small jobs)",
    )
    mode = r.add_mutually_exclusive_group()
    mode.add_argument(
        "--overwrite", action="store_true", help="replace a table built with another config or input set"
    )
    mode.add_argument(
        "--append",
        action="store_true",
        help="add the inputs a finished table lacks (a collection that grew) as new shards; its own shards, "
        "config and classes stay",
    )
    mode.add_argument(
        "--retry-errors",
        action="store_true",
        help="as --append, and tokenize again the inputs the table holds as error rows (files fixed since, "
        "a decoder upgraded)",
    )
    r.add_argument("--max-error-rate", type=float, metavar="FRACTION",
                   help="fail (exit 1) when more than this fraction of inputs is rejected, e.g. 0.05")  # fmt: skip
    r.add_argument("--input-timeout", type=float, default=None, metavar="SECONDS",
                   help="end a Ray worker whose input gives no record for this long (a decoder hung on a damaged "
                        "file); the input becomes an error row and the job goes on (default 300; 0: no limit)")  # fmt: skip
    r.add_argument("--no-progress", action="store_true", help="no progress bar")


def _parse_value(v: str) -> Any:
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def _load_config(path: str | None, overrides: list[str]) -> dict[str, Any]:
    cfg: dict[str, Any] = {}
    if path:
        if not os.path.isfile(path):
            raise ValueError(f"{path}: no such config file")
        low = path.lower()
        if not low.endswith((".json", ".toml", ".yaml", ".yml")):
            raise ValueError(f"{path}: config file must be .json, .toml or .yaml")
        with open(path, "rb") as f:
            data = f.read()
        try:
            if low.endswith(".json"):
                cfg = json.loads(data)
            elif low.endswith(".toml"):
                import tomllib

                cfg = tomllib.loads(data.decode())
            else:
                import yaml

                cfg = yaml.safe_load(data) or {}
        except Exception as e:  # syntax errors (JSON's and TOML's are ValueErrors), bytes that are not UTF-8
            reason = " ".join(str(e).split())  # YAML's messages span lines
            raise ValueError(f"{path}: cannot parse config ({reason})") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"{path}: config must be a mapping of field -> value")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        cfg[key.strip()] = _parse_value(value)
    return cfg


SMALL_JOB_SHARE = 0.5
"""Share of a job's wall time spent starting Ray and its actors above which the CLI suggests
``--num-workers 0`` (an embedded Ray's start-up is 4-7 s on a 2-core machine; see the README)."""


def small_job_hint(result: PreprocessResult, embedded: bool) -> str | None:
    """A one-line note when an embedded Ray's start-up took most of the job (``startup_seconds``: until
    a worker began its first shard), else None. Not for a cluster (its start-up is a running Ray's)
    nor for runs in this process or with nothing to do."""
    if not embedded or result.workers == 0 or result.already_done or result.seconds <= 0:
        return None
    if result.startup_seconds <= SMALL_JOB_SHARE * result.seconds:
        return None
    return (
        f"maskloom preprocess: note: starting Ray took {result.startup_seconds:.1f} of this job's "
        f"{result.seconds:.1f} s; a job this small runs faster in this process: --num-workers 0"
    )


def _committed(out: str) -> int:
    """Shards committed in table directory ``out`` so far (their commit records)."""
    from maskloom.pipelines.preprocess import COMMITS, RUN_STATE

    try:
        n = sum(1 for f in os.listdir(os.path.join(out, COMMITS)) if f.endswith(".json") and f != RUN_STATE)
    except OSError:
        n = 0
    return n


def _error(msg: str) -> int:
    print(f"maskloom preprocess: error: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    import importlib

    from maskloom._paths import check_out_dir
    from maskloom.pipelines.preprocess import PreprocessError, TableConflictError, preprocess
    from maskloom.pipelines.ray_utils import RayConnectError, resolve_address
    from maskloom.pipelines.sources import SourceError, find_inputs, missing_note, skipped_note
    from maskloom.registry import RegistryError
    from maskloom.tokenizers.base import TOKENIZERS, get_tokenizer

    for m in args.imports:
        try:
            importlib.import_module(m)
        except ImportError as e:
            return _error(f"--import: {e}")
        except Exception as e:  # the plug-in's own error (a syntax error, a failing import-time line)
            import traceback

            log.debug("".join(traceback.format_exception(e)))
            where = f" ({e.filename}, line {e.lineno})" if isinstance(e, SyntaxError) else ""
            return _error(f"--import {m}: {type(e).__name__}: {e.msg if isinstance(e, SyntaxError) else e}{where}"
                          " (-vv shows the traceback)")  # fmt: skip
    try:
        cls = TOKENIZERS.get(args.modality)
        config = _load_config(args.config, args.set)
        tok = get_tokenizer(args.modality, config)  # validate the config before any work
        if args.num_workers is not None and args.num_workers < 0:
            raise ValueError(
                f"--num-workers must be >= 0 (0: in this process, without Ray), got {args.num_workers}"
            )
        if args.shard_size is not None and args.shard_size < 1:
            raise ValueError(f"--shard-size must be >= 1, got {args.shard_size}")
        if args.max_error_rate is not None and not 0.0 <= args.max_error_rate <= 1.0:
            raise ValueError(f"--max-error-rate must lie in [0, 1], got {args.max_error_rate}")
        if args.input_timeout is not None and args.input_timeout < 0:
            raise ValueError(f"--input-timeout must be >= 0 seconds (0: no limit), got {args.input_timeout}")
        check_out_dir(args.out)  # a URL, or a file of that name: before the inputs are listed
        found = find_inputs(
            args.inputs, extensions=cls.extensions, labels=args.labels, label_regex=args.label_regex,
            manifest=args.manifest, as_one_source=args.as_one_source, companions=tok.companion_files,
        )  # fmt: skip
    except ImportError as e:  # the tokenizer needs a package that is not installed
        return _error(f"-m {args.modality}: {e}")
    except SourceError as e:
        hint = ""
        if cls.folder_source and not args.as_one_source and "no input files" in str(e):
            hint = f" ({cls.folder_source} is one input: add --as-one-source)"
        return _error(f"{e}{hint}")
    except (RegistryError, ValueError, TypeError) as e:
        return _error(str(e))
    n = len(found)
    print(
        f"maskloom preprocess: {n:,} input{'' if n == 1 else 's'} -> {args.out} ({args.modality})",
        file=sys.stderr,
    )
    if found.skipped:
        note = skipped_note(found.skipped, "the input folders", cls.extensions)
        print(f"maskloom preprocess: note: {note}", file=sys.stderr)
    if found.missing:
        print(f"maskloom preprocess: note: {missing_note(found.missing)}", file=sys.stderr)
    try:
        result = preprocess(
            found, args.modality, config, args.out, address=args.address, num_workers=args.num_workers,
            cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
            object_store_memory=args.object_store_memory, shard_size=args.shard_size, overwrite=args.overwrite,
            append=args.append, retry_errors=args.retry_errors, max_error_rate=args.max_error_rate,
            imports=args.imports, progress=not args.no_progress,
            **({} if args.input_timeout is None else {"input_timeout": args.input_timeout}),
        )  # fmt: skip
    except KeyboardInterrupt:
        n = _committed(args.out)
        print(f"maskloom preprocess: interrupted; {n} committed shard{'s' if n != 1 else ''} kept: "
              "run the same command again to resume", file=sys.stderr)  # fmt: skip
        return 130
    except (TableConflictError, RayConnectError) as e:
        return _error(str(e))
    except PreprocessError as e:
        print(f"maskloom preprocess: failed: {e}", file=sys.stderr)
        return 1
    print(result.summary())
    hint = small_job_hint(result, embedded=resolve_address(args.address) == "local")
    if hint:
        print(hint, file=sys.stderr)
    return 0
