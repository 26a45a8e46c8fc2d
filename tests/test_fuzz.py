"""Fuzzed loaders (issue 14, guarantee 5): configs, --set overrides, search spaces and evalseg pickles built from the
real files and mutated (wrong types, out-of-range values, unknown keys, flipped, cut and inserted bytes, hostile
globals) give a valid object or one MedsegError line: never another exception, never code run.

The checks are plain functions returning an outcome name; ``PROPERTIES`` pairs each with its strategy, so
benchmarks/bench_reliability.py drives the same checks with more examples and counts the outcomes.
"""
from __future__ import annotations

import copy
import gzip
import pickle
import struct
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medseg.config import config_from_dict, load_config, load_yaml, parse_override
from medseg.data.evalseg_pickle import read_label_pickle
from medseg.errors import MedsegError
from medseg.search_space import load_space

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs" / "exp_000_baseline.yaml"
SPACE_FILE = REPO / "search_spaces" / "default.yaml"
EVALSEG_DIR = REPO.parent / "shared" / "data" / "evalseg"
VALID, REFUSED = "valid", "refused_one_line"
EXAMPLES = 300  # per property in `make test` (the whole file in about 10 s); the benchmark runs more


def outcome(load: Callable[[], Any]) -> str:
    """``valid``, ``refused_one_line`` (a MedsegError of one non-empty line), else what escaped: the name of the
    exception type and its first line, or ``multi_line_error: ...``."""
    try:
        load()
    except MedsegError as err:
        text = str(err)
        return REFUSED if len(text.splitlines()) == 1 and text.strip() else f"multi_line_error: {text[:200]!r}"
    except Exception as err:  # what the guarantee forbids: reported, not raised, so the benchmark can count it
        return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    return VALID


# ------------------------------------------------------------------------------------------------ strategies

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from([-1, 0, 1, 2, 31, 33, 1025, 10**9]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([-1e-9, 0.0, 0.5, 1.0, 1.5, 1e308]),
    st.text(max_size=12), st.sampled_from(["", "\x00", "a\nb", "~", "s3://x", "../..", "{", "[", "*", "=", "a.b"]),
)
DOMAINS = st.fixed_dictionaries({"type": st.sampled_from(["uniform", "loguniform", "int", "choice"])},
                                optional={"low": SCALARS, "high": SCALARS, "values": st.lists(SCALARS, max_size=3)})
GARBAGE = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6) | DOMAINS
KEYS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.0123456789 =\n\x1c\x85", min_size=0, max_size=12)


def _paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a nested dict/list (sections and leaves), the root excluded."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    out = []
    for key, value in items:
        out.append(prefix + (key,))
        out.extend(_paths(value, prefix + (key,)))
    return out


@st.composite
def mutated_tree(draw, base: dict, max_edits: int = 3) -> dict:
    """``base`` with 1..max_edits edits: a field (or section) set to garbage, removed, or an unknown key added."""
    tree = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, max_edits))):
        paths = _paths(tree)
        op = draw(st.sampled_from(["set", "set", "delete", "add"]))
        path = draw(st.sampled_from(paths)) if paths else ()
        parent = tree
        for key in path[:-1]:
            parent = parent[key]
        if op == "add" or not path:
            target = parent[path[-1]] if path and isinstance(parent[path[-1]], dict) else tree
            target[draw(KEYS)] = draw(GARBAGE)
        elif op == "delete":
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(GARBAGE)
    return tree


def _byte_edits(draw, data: bytes, max_edits: int = 4) -> bytes:
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, max_edits))):
        op = draw(st.sampled_from(["flip", "flip", "truncate", "insert", "delete"]))
        pos = draw(st.integers(0, max(len(buf) - 1, 0)))
        if op == "flip" and buf:
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del buf[pos:]
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif buf:
            del buf[pos:pos + draw(st.integers(1, 16))]
    return bytes(buf)


@st.composite
def mutated_bytes(draw, samples: list[bytes]) -> bytes:
    return _byte_edits(draw, draw(st.sampled_from(samples)))


# --------------------------------------------------------------------------------------------------- configs


def _base_config() -> dict:
    return load_yaml(BASE_CONFIG)


def check_config(tree: dict) -> str:
    """A mutated config dict, validated and resolved like a loaded file."""
    return outcome(lambda: config_from_dict(tree, source="fuzz.yaml"))


def check_config_text(text: bytes) -> str:
    """A config file with flipped, cut or inserted bytes, read by load_config."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.yaml"
        path.write_bytes(text)
        return outcome(lambda: load_config(path))


def check_override(args: tuple[str, str]) -> str:
    """``--set key=value`` with any key and any value text, applied to the baseline config."""
    key, value = args
    return outcome(lambda: config_from_dict(_base_config(), source="fuzz.yaml", overrides=[f"{key}={value}"],
                                            resolve=False))


def override_strategy():
    keys = st.one_of(KEYS, st.sampled_from([p for p in map(".".join, (tuple(map(str, p)) for p in
                                                                       _paths(_base_config())))]))
    values = st.one_of(st.text(max_size=16), GARBAGE.map(lambda v: yaml.safe_dump(v, default_flow_style=True)),
                       st.sampled_from(["[", "{a: ", "&a [*a]", "!!python/object:os.system", "1e999", "- - -"]))
    return st.tuples(keys, values.map(lambda v: v.strip()))


# ----------------------------------------------------------------------------------------------- search spaces


def _base_space() -> dict:
    raw = load_yaml(SPACE_FILE)
    raw["base_config"] = str((SPACE_FILE.parent / raw["base_config"]).resolve())  # the space is written elsewhere
    return raw


def check_space(tree: dict) -> str:
    """A mutated search-space file, written to a temporary folder and loaded by load_space."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "space.yaml"
        path.write_text(yaml.safe_dump(tree, allow_unicode=True))
        return outcome(lambda: load_space(path))


# ------------------------------------------------------------------------------------------------ evalseg pickles


def real_pickles(n: int = 4) -> list[bytes]:
    """The ``n`` smallest real GroundTruth pickles of ../shared, decompressed (empty when ../shared is absent)."""
    files = sorted(EVALSEG_DIR.glob("*/GroundTruth/*.pkl*"), key=lambda p: (p.stat().st_size, str(p)))[:n]
    return [gzip.decompress(p.read_bytes()) if p.name.endswith(".gz") else p.read_bytes() for p in files]


def check_pickle(data: bytes) -> str:
    """Bytes written as a .pkl.gz (when they start with the gzip magic) or .pkl and decoded by read_label_pickle."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("case.pkl.gz" if data[:2] == b"\x1f\x8b" else "case.pkl")
        path.write_bytes(data)
        return outcome(lambda: read_label_pickle(path))


HOSTILE_GLOBALS = [("os", "system"), ("posix", "system"), ("builtins", "eval"), ("builtins", "exec"),
                   ("subprocess", "getoutput"), ("__builtin__", "eval"), ("nt", "system")]


def _payload(module: str, name: str, sentinel: Path, stack_global: bool) -> bytes:
    """Pickle opcodes that call ``module.name`` on a command creating ``sentinel``, then POP the result."""
    if name in ("eval", "exec"):
        arg = f"open({str(sentinel)!r}, 'w').close()"
    else:
        arg = f"touch {sentinel}"

    def unicode(text: str) -> bytes:
        raw = text.encode()
        return b"\x8c" + bytes([len(raw)]) + raw if len(raw) < 256 else b"X" + struct.pack("<I", len(raw)) + raw

    ref = unicode(module) + unicode(name) + b"\x93" if stack_global else f"c{module}\n{name}\n".encode()
    return ref + unicode(arg) + b"\x85R0"  # TUPLE1, REDUCE, POP


@st.composite
def hostile_pickle(draw, samples: list[bytes]) -> tuple[bytes, bool]:
    """(bytes, at_start): a real pickle with a hostile call inserted right after its PROTO/FRAME header (it would
    run first) or at any offset, optionally with further byte edits; the sentinel path is filled in by the check."""
    data = draw(st.sampled_from(samples))
    module, name = draw(st.sampled_from(HOSTILE_GLOBALS))
    at_start = draw(st.booleans())
    header = 11 if data[2:3] == b"\x95" else 2  # PROTO 4 + FRAME 8-byte length
    pos = header if at_start else draw(st.integers(0, len(data)))
    marker = f"{module}|{name}|{int(draw(st.booleans()))}".encode()
    mutated = data[:pos] + b"\x00HOSTILE:" + marker + b"\x00" + data[pos:]
    return (_byte_edits(draw, mutated, 2) if not at_start and draw(st.booleans()) else mutated), at_start


def check_hostile_pickle(case: tuple[bytes, bool]) -> str:
    """The payload is decoded and refused, and its sentinel file never appears: ``code_run`` if it does."""
    data, at_start = case
    with tempfile.TemporaryDirectory() as tmp:
        sentinel = Path(tmp) / "code_ran"
        data = _fill_payload(data, sentinel)
        result = check_pickle(data)
        if sentinel.exists():
            return "code_run"
        if at_start and result != REFUSED:
            return f"not refused: {result}"
    return result


def _fill_payload(data: bytes, sentinel: Path) -> bytes:
    start = data.find(b"\x00HOSTILE:")
    end = data.find(b"\x00", start + 1)
    if start < 0 or end < 0:
        return data
    try:
        module, name, stack = data[start + 9:end].decode().split("|")
    except ValueError:  # a byte edit hit the marker: the bytes stay as they are
        return data
    return data[:start] + _payload(module, name, sentinel, stack == "1") + data[end + 1:]


# ------------------------------------------------------------------------------------------------ the properties


def properties(evalseg: bool = True) -> dict[str, tuple[Callable[[Any], str], st.SearchStrategy]]:
    """Name -> (check, strategy); the evalseg ones only when the real pickles are there."""
    props = {
        "config": (check_config, mutated_tree(_base_config())),
        "config_file_bytes": (check_config_text, mutated_bytes([BASE_CONFIG.read_bytes()])),
        "config_override": (check_override, override_strategy()),
        "search_space": (check_space, mutated_tree(_base_space())),
    }
    samples = real_pickles() if evalseg else []
    if samples:
        gz = [gzip.compress(s, mtime=0) for s in samples[:2]]
        props["evalseg_pickle_random_bytes"] = (check_pickle, st.binary(max_size=256) | st.binary(max_size=64).map(
            lambda b: b"\x80\x04" + b))
        props["evalseg_pickle_mutated"] = (check_pickle, mutated_bytes(samples + gz))
        props["evalseg_pickle_hostile"] = (check_hostile_pickle, hostile_pickle(samples))
    return props


def fuzz_settings(examples: int):
    """Reproducible (derandomized, no example database), no deadline: the first config validation imports smp."""
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def run_property(name: str, examples: int, tally: Callable[[str], None] | None = None) -> None:
    """Drive one property for ``examples`` examples; ``tally`` sees every outcome, else any escape fails."""
    check, strategy = properties(evalseg=name.startswith("evalseg"))[name]

    @fuzz_settings(examples)
    @given(strategy)
    def prop(case):
        result = check(case)
        if tally is not None:
            tally(result)
        else:
            assert result in (VALID, REFUSED), result

    prop()


def _need_evalseg() -> None:
    if not EVALSEG_DIR.is_dir():
        pytest.skip(f"real evalseg pickles not found at {EVALSEG_DIR} (check out ../shared beside the repo)")


@pytest.mark.parametrize("name", ["config", "config_file_bytes", "config_override", "search_space"])
def test_config_loaders_give_a_config_or_one_error_line(name):
    run_property(name, EXAMPLES)


@pytest.mark.parametrize("name", ["evalseg_pickle_random_bytes", "evalseg_pickle_mutated", "evalseg_pickle_hostile"])
def test_evalseg_decoder_gives_a_volume_or_one_error_line_and_runs_no_code(name):
    _need_evalseg()
    run_property(name, EXAMPLES)


def test_hostile_payload_would_run_if_unrestricted(tmp_path):
    """The payload is live: plain pickle runs it (so the sentinel check above can fail)."""
    sentinel = tmp_path / "code_ran"
    pickle.loads(b"\x80\x04" + _payload("builtins", "exec", sentinel, True) + b"N.")
    assert sentinel.exists()


@pytest.mark.parametrize("key", ["a\nb", "training.lr\x1c", "training\n.lr"])
def test_searched_key_with_a_line_break_is_one_error_line(key):
    space = _base_space()
    assert check_space({**space, "params": {**space["params"], key: {"type": "choice", "values": [1]}}}) == REFUSED


def test_override_with_broken_yaml_is_one_config_error():
    assert parse_override("training.lr=3e-4") == ("training.lr", 3e-4)
    assert check_override(("training.lr", "[")) == REFUSED
    assert check_override(("dataset.path.\nx", "1")) == REFUSED  # the key is named in the error, on one line
