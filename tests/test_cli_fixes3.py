"""Fixes of the command line: an error's JSON piped to a reader that has
gone is no traceback; Ctrl-C is an error as any other (exit 130, the JSON
error object); verify takes the options its refusals suggest, and a refusal
suggests only options its command takes; per-output estimates carry their
errors in the text; usage errors in the command line's spelling, with the
command's usage line; a question no algorithm answers is a usage error (2),
not a refusal over the budget (3); counts agree with their nouns."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import tsalgebra as ts
import tsalgebra.cli as cli
from helpers import TINY_LM_TEMPLATE, exit_code, saved_bilinears, template_checkpoints
from tsalgebra.problem import Alternative

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return saved_bilinears(tmp_path_factory.mktemp("ck"))  # 3 -> 4 -> 2


def _spawn(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, text=True, **kw)


# ------------------------------------------------------------ broken pipe


@pytest.mark.parametrize("args", [["similarity", "nope.pt", "x.pt", "--json"],  # an error of the command
                                  ["similarity", "--bogus", "a", "b", "--json"]])  # one of the parser
def test_an_errors_json_to_a_reader_that_has_gone_is_no_traceback(args):
    read, write = os.pipe()
    os.close(read)  # the reader has gone before anything is written: every write to stdout fails
    try:
        p = _spawn("-m", "tsalgebra", *args, stdout=write, stderr=subprocess.PIPE)
    finally:
        os.close(write)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2, err
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err
    assert "tsalgebra" in err and "error:" in err


# --------------------------------------------------------------- Ctrl-C


def test_an_interrupt_is_the_json_error_object_exit_130(monkeypatch, capsys):
    def stopped(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_summary", stopped)
    code, out, err = exit_code(capsys, "summary", "--json")
    assert code == cli.EXIT_INTERRUPTED == 130
    assert json.loads(out) == {"error": "interrupted", "exit_code": 130}
    assert "tsalgebra: error: interrupted" in err


def test_sigint_gives_the_json_error_object_and_130_is_documented():
    code = ("import sys, time, tsalgebra.cli as c\n"
            "def slow(args):\n"
            "    print('ready', file=sys.stderr, flush=True)\n"
            "    time.sleep(60)\n"
            "c.cmd_summary = slow\n"
            "sys.exit(c.main(['summary', '--json']))\n")
    p = _spawn("-c", code, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stderr.readline().strip() == "ready"
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert json.loads(out) == {"error": "interrupted", "exit_code": 130}
    assert "Traceback" not in err
    assert "130 interrupted" in cli.__doc__
    guide = (ROOT / "docs" / "user-guide.md").read_text()
    assert "**130** interrupted" in guide


# ------------------------------------------------- verify's alternatives


def test_verify_takes_the_options_its_refusals_suggest(files, capsys):
    a = str(files[0])
    code, out, err = exit_code(capsys, "verify", a, a, "--budget", "10", "--json")
    assert code == 3, err
    alternatives = json.loads(out)["alternatives"]
    assert any(x.startswith("--budget ") for x in alternatives) and "unrecognized" not in err
    assert any(x.startswith("--method sampled") for x in alternatives)
    for alt in alternatives:  # each one verify accepts (another method's cost is judged apart: it may refuse)
        flags = alt.split(" (")[0].split()
        extra = ["--samples", "400", "--seed", "0"] if flags == ["--method", "sampled"] else []
        code, out, err = exit_code(capsys, "verify", a, a, "--budget", "10", *flags, *extra, "--json")
        assert code in (0, 3) and "unrecognized" not in err, (alt, err)
        if flags[0] == "--budget":  # the budget suggested answers it
            assert code == 0 and json.loads(out)["verdict"].startswith("equal"), (alt, err)


def test_verify_help_lists_the_computation_options(capsys):
    code, out, _ = exit_code(capsys, "verify", "--help")
    assert code == 0
    for flag in ("--method", "--budget", "--max-memory", "--samples", "--rel-error", "--seed"):
        assert flag in out, flag


def test_verify_sampled_reports_its_errors_and_refuses_exact(files, capsys):
    a, b = map(str, files[:2])
    code, out, err = exit_code(capsys, "verify", a, b, "--method", "sampled", "--samples", "300", "--seed", "3",
                               "--json")
    got = json.loads(out)
    assert code == 1 and got["verdict"] == "different", err
    assert got["method"] == "sampled" and got["accuracy"] == "estimated" and got["samples"] == 300
    assert got["seed"] == 3 and got["stderr"]["similarity"] > 0
    code, out, err = exit_code(capsys, "verify", a, b, "--method", "sampled", "--exact", "--json")
    assert code == 2 and "--exact" in json.loads(out)["error"] and "exact=" not in err
    code, _, err = exit_code(capsys, "verify", a, b, "--seed", "3")
    assert code == 2 and "--method sampled" in err


def test_a_refusal_lists_only_what_its_command_takes(files):
    alts = (Alternative("budget", 2.5e13, "the cheapest estimate"), Alternative("inner", "network", "layer-wise"),
            Alternative("method", "sampled", "an estimate"), Alternative("route", "pairwise", "pair by pair"),
            Alternative("algorithm", "pairings", "an algorithm"), Alternative("samples", 3.09e8, "samples"),
            Alternative("max_memory", 1e30, "more than any machine"))  # a finite size --max-memory takes
    parser = cli.build_parser()
    verify = parser.parse_args(["verify", "a", "b"])
    assert [a.option for a in cli._passable(alts, verify)] == ["budget", "method", "samples", "max_memory"]
    exact = parser.parse_args(["verify", "a", "b", "--exact"])
    assert [a.option for a in cli._passable(alts, exact)] == ["budget", "samples", "max_memory"]
    similarity = parser.parse_args(["similarity", "a", "b"])
    assert [a.option for a in cli._passable(alts, similarity)] == ["budget", "inner", "method", "samples", "max_memory"]
    matrix = parser.parse_args(["matrix", "a", "b"])
    assert [a.option for a in cli._passable(alts, matrix)] == ["budget", "inner", "method", "route", "samples",
                                                               "max_memory"]
    # the count a refusal spells as 3.09e+08 is one --samples takes
    assert parser.parse_args(["similarity", "a", "b", "--samples", "3.09e+08"]).samples == 309_000_000


# ---------------------------------------------- per-output estimates' errors


def test_per_output_estimates_print_their_standard_errors(files, capsys):
    args = ["similarity", *map(str, files[:2]), "--method", "sampled", "--samples", "300", "--seed", "0",
            "--per-output"]
    code, out, err = exit_code(capsys, *args)
    assert code == 0, err
    code, js, _ = exit_code(capsys, *args, "--json")
    got = json.loads(js)
    lines = [line for line in out.splitlines() if line.strip().startswith("output ")]
    assert len(lines) == len(got["value"]) == 2
    for k, line in enumerate(lines):
        assert re.fullmatch(rf"\s*output {k}: -?\d+\.\d{{6}} ± \S+", line), line
        assert float(line.split("± ")[1]) == pytest.approx(got["stderr"][k], rel=0.05)
    code, out, _ = exit_code(capsys, "similarity", *map(str, files[:2]), "--per-output")  # exact: no ±
    assert code == 0 and "±" not in out


# ------------------------------------------------ exit codes and spelling


def test_verify_a_directory_is_a_usage_error_with_verifys_usage(files, capsys):
    code, out, err = exit_code(capsys, "verify", files[0].parent, files[0], "--json")
    assert code == 2 and "is a directory" in json.loads(out)["error"] and "Errno" not in err
    assert err.startswith("usage: tsalgebra verify "), err


def test_unrecognized_arguments_show_the_commands_usage(files, capsys):
    code, _, err = exit_code(capsys, "similarity", *files[:2], "--bogus")
    assert code == 2 and err.startswith("usage: tsalgebra similarity ") and "--bogus" in err


@pytest.mark.parametrize("args, flag", [(["summary", "--seed", "-5"], "--seed"),
                                        (["similarity", "a", "b", "--max-memory", "inf"], "--max-memory"),
                                        (["matrix", "a", "b", "--workers", "100000"], "--workers")])
def test_option_values_out_of_range_name_their_flag(args, flag, capsys):
    code, _, err = exit_code(capsys, *args)
    assert code == 2 and f"argument {flag}:" in err and f"usage: tsalgebra {args[0]} " in err, err
    if flag == "--workers":
        assert "--scheduler" in err  # what to give for a larger cluster


def test_notes_and_route_refusals_are_spelled_as_flags(files, capsys):
    code, out, err = exit_code(capsys, "similarity", *files[:2], "--state-key", "ema")
    assert code == 0 and "--state-key ema not used" in out and "state_key" not in out, out
    text, found = cli._cli_spelling("route 'materialize' needs about 1.27e+04 bytes", ["materialize"])
    assert text == "--route materialize needs about 1.27e+04 bytes" and found


def test_a_question_no_algorithm_answers_is_a_usage_error(tmp_path, capsys):
    """--inner network on attention layers: no algorithm applies at any
    cost; no budget or memory bound answers it (exit 2, not the refusal's 3)."""
    template, (m1, m2) = template_checkpoints(tmp_path, "arch_net", TINY_LM_TEMPLATE)
    code, out, err = exit_code(capsys, "similarity", m1, m2, "--template", template, "--inner", "network", "--json")
    got = json.loads(out)
    assert code == 2 and got["exit_code"] == 2 and "no exact algorithm applies" in got["error"], err
    # a refusal over the budget is still 3
    code, out, err = exit_code(capsys, "similarity", m1, m2, "--template", template, "--budget", "1", "--json")
    assert code == 3 and json.loads(out)["exit_code"] == 3 and "budget" in json.loads(out)["error"], err


def test_counts_agree_with_their_nouns(files, capsys, tmp_path):
    (tmp_path / "one.txt").write_text("a^2\n")
    code, _, err = exit_code(capsys, "verify", tmp_path / "one.txt", files[0], "--symbols", "a")
    assert code == 2 and "--symbols names 1 input," in err, err
    assert cli.counted(1, "contraction") == "1 contraction" and cli.counted(3, "orbit") == "3 orbits"
