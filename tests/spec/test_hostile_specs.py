"""Hostile and mistaken spec files (harness.spec.loader, issue 25 item 6): refused, exit 2,
with a short report naming the file and the fix, before anything can exhaust the machine.

- an alias bomb (a "billion laughs" in a tag value), a value that contains itself, values
  nested 20,000 deep, long values, 300 problems: ``tests/specs/bad/48-52`` (also checked by
  the corpus tests of test_spec_cli.py), and here through one ``python -m harness validate``
  subprocess with the files too large for the corpus (a 50 MB file, 1 MiB + 1 byte, a
  900 KB string, 100,001 values): every report under 2,000 characters;
- the same limits on ``key=value`` overrides, and an override without ``=``;
- ``python -m harness run`` of the 50 MB file;
- what is still accepted: aliases that expand a little, nesting at the limit, long
  messages that quote nothing long.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness.spec import SpecError, load_spec
from harness.spec import loader
from services import user_env

REPO = Path(__file__).resolve().parents[2]
BAD = REPO / "tests" / "specs" / "bad"
HOSTILE = ["48_alias_bomb.yaml", "49_recursive_alias.yaml", "50_deep_nesting.yaml",
           "51_long_values.yaml", "52_many_problems.yaml"]
GOOD = """\
schema: 1
name: good
backbones: [{name: tiny_vgg}]
data: {kind: quickstart, limit: 2}
methods: [{name: gradcam}]
"""
LIMIT = 2_000        # characters of one file's report


def harness(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """``python -m harness ARGS`` from an empty folder with private stores."""
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    env = user_env(HARNESS_CACHE_DIR=str(tmp_path / "cache"),
                   MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def reports(output: str) -> dict[str, str]:
    """{file name: its report} of a ``validate`` of several files (any name, not only
    ``*.yaml``: an override without ``=`` is reported as a file)."""
    out, current = {}, None
    for line in output.splitlines():
        m = re.match(r"^(\S.*?): \d+ problems?; nothing was started\.$", line)
        if m:
            current = Path(m.group(1)).name
            out[current] = ""
        if current:
            out[current] += line + "\n"
    return out


def bomb(levels: int = 6) -> str:
    """A flow sequence of 9 ** levels strings in 9 * levels aliases."""
    parts = ['&x0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    parts += [f"&x{i} [" + ", ".join([f"*x{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "[" + ", ".join(parts) + "]"


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    """One ``validate`` of the hostile corpus files and the large files made here."""
    tmp = tmp_path_factory.mktemp("hostile")
    big = tmp / "fifty_mb.yaml"
    with big.open("wb") as f:                   # sparse: 50 MB without writing them
        f.write(b"schema: 1\nname: big\n# ")
        f.truncate(50 * 2 ** 20)
    over = tmp / "one_mib_and_one.yaml"
    over.write_text("schema: 1\n#" + "x" * (loader.MAX_SPEC_BYTES - 11) + "\n")
    assert over.stat().st_size == loader.MAX_SPEC_BYTES + 1
    string = tmp / "long_string.yaml"
    string.write_text("y" * 900_000 + "\n")     # under 1 MiB: the top level is a string
    values = tmp / "many_values.yaml"
    values.write_text("schema: 1\nname: many\nevaluation: {keep_fractions: ["
                      + "1, " * 100_001 + "]}\n")
    files = [str(BAD / name) for name in HOSTILE] + [str(p) for p in (big, over, string, values)]
    return harness(["validate", *files], tmp)


def test_validate_refuses_each_with_a_short_report(validated):
    assert validated.returncode == 2
    out = validated.stdout + validated.stderr
    assert "Traceback" not in out and "RecursionError" not in out and "MemoryError" not in out
    found = reports(validated.stderr)
    assert set(found) == set(HOSTILE) | {"fifty_mb.yaml", "one_mib_and_one.yaml",
                                         "long_string.yaml", "many_values.yaml"}
    for name, report in found.items():
        assert len(report) < LIMIT, f"{name}: {len(report)} characters:\n{report[:3000]}"
    assert len(validated.stderr) < LIMIT * len(found)
    fixes = {"48_alias_bomb.yaml": "write the values out, or repeat fewer aliases",
             "49_recursive_alias.yaml": "so the value would contain itself; write it out",
             "50_deep_nesting.yaml": "nested more than 50 levels deep; a spec nests a few",
             "51_long_values.yaml": "characters ...]",
             "52_many_problems.yaml": "... and 280 more problems not listed",
             "fifty_mb.yaml": "the file is 52,428,800 bytes; a spec is at most 1,048,576 bytes",
             "one_mib_and_one.yaml": "the file is 1,048,577 bytes",
             "long_string.yaml": "expected a mapping of keys at the top level, got 'yyyy",
             "many_values.yaml": "the file holds more than 100,000 values"}
    for name, fix in fixes.items():
        assert fix in found[name], f"{fix!r} not in:\n{found[name]}"
    assert "[... 899,810 characters ...]" in found["long_string.yaml"]


def test_overrides_are_held_to_the_same_limits(tmp_path):
    """An alias bomb or 20,000 nested lists given as an override's value, and an override
    without '=' (taken for a spec file by ``validate``: the refusal says how to write it)."""
    spec = tmp_path / "good.yaml"
    spec.write_text(GOOD)
    deep = "seed=" + "[" * 20_000 + "]" * 20_000
    result = harness(["validate", str(spec), "train.epochs", f"tracking.tags.x={bomb()}", deep],
                     tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    found = reports(result.stderr)
    assert "file not found; if 'train.epochs' is meant as an override, give it a value: " \
           "train.epochs=VALUE" in found["train.epochs"]
    report = found["good.yaml"]
    assert len(report) < LIMIT, report[:3000]
    assert "override 'tracking.tags.x=[&x0" in report
    assert "refused: aliases (*name) expand this value to more than 100,000 values" in report
    assert "refused: values nested more than 50 levels deep" in report
    assert "characters ...]" in report                    # the overrides quoted as excerpts


def test_run_refuses_the_fifty_mb_file(tmp_path):
    big = tmp_path / "big.yaml"
    with big.open("wb") as f:
        f.write(b"schema: 1\n# ")
        f.truncate(50 * 2 ** 20)
    result = harness(["run", str(big)], tmp_path)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr) < LIMIT
    assert f"{big}: 1 problem; nothing was started." in result.stderr
    assert "a spec is at most 1,048,576 bytes (1 MiB)" in result.stderr
    assert list((tmp_path / "cwd").iterdir()) == [] and not (tmp_path / "cache").exists()


# -- in process: what the limits still accept -----------------------------------------------
def test_aliases_that_expand_a_little_are_accepted(tmp_path):
    spec = tmp_path / "aliases.yaml"
    spec.write_text(GOOD + "train: &t {epochs: 1, batch_size: 8}\n"
                    "tracking:\n  tags: {a: &v 'x', b: *v}\n")
    loaded = load_spec(spec)
    assert loaded.train.epochs == 1 and loaded.tracking.tags == {"a": "x", "b": "x"}


def test_nesting_up_to_the_limit_reaches_validation():
    """MAX_DEPTH levels compose (the value's own problem is reported); one more is refused."""
    text = "schema: 1\nseed: " + "[" * (loader.MAX_DEPTH - 1) + "]" * (loader.MAX_DEPTH - 1)
    data, problems = loader.parse_yaml(text)
    assert problems == [] and isinstance(data["seed"], list)
    text = "schema: 1\nseed: " + "[" * loader.MAX_DEPTH + "]" * loader.MAX_DEPTH
    data, problems = loader.parse_yaml(text)
    assert data is None and "nested more than 50 levels deep" in problems[0][1]


def test_bomb_below_the_limit_is_read():
    """9 ** 5 = 59,049 strings: under MAX_VALUES, composed once, shared."""
    data, problems = loader.parse_yaml(f"a: {bomb(5)}\n")
    assert problems == [] and data["a"][4][0] is data["a"][4][1]
    data, problems = loader.parse_yaml(f"a: {bomb(6)}\n")
    assert data is None and "alias bomb" in problems[0][1]


def test_messages_keep_long_text_that_quotes_no_long_value():
    """Only long values are cut: a 1,100-character list of names stays whole; a message
    over MAX_MESSAGE is cut in the middle whatever it holds."""
    names = ", ".join(f"name{i:03d}" for i in range(140))
    err = loader.refusal("f.yaml", [("a", f"unknown 'x'. Available: {names}")], {"a": "x"})
    assert names in err.format()
    err = loader.refusal("f.yaml", [("a", "z " * 5_000)])
    assert len(err.problems[0][1]) < 300 and "characters ...]" in err.problems[0][1]
    value = "v" * 1_000
    err = loader.refusal("f.yaml", [("a", f"got '{value}' (a string); write a number")],
                         {"a": value})
    message = err.problems[0][1]
    assert message.startswith("got 'vvv") and message.endswith("(a string); write a number")
    assert len(message) < 300


def test_spec_error_keeps_every_problem():
    problems = [(f"k{i}", "bad") for i in range(30)]
    err = loader.refusal("f.yaml", problems)
    assert isinstance(err, SpecError) and len(err.problems) == 30
    text = err.format()
    assert text.startswith("f.yaml: 30 problems; nothing was started.")
    assert "k19: bad" in text and "k20: bad" not in text
    assert text.endswith("... and 10 more problems not listed (the first 20 are)")
