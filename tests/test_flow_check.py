"""Flow validation: the corpus of broken flows in ``tests/flows_bad``, lint warnings, ``load_flows`` across files
and the ``ivr-bridge flows check`` command.

Each corpus file starts with ``# expect: <line>:<column>: <substring of the message>`` lines naming every
diagnostic the loader must report for it (and no others), so a diagnostic that moves, changes or multiplies
fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bridge.catalogue import load_catalogue
from bridge.cli import main
from ivr.flow import MAX_MENU_DEPTH, Flow, FlowError, Problem, load_flow, load_flow_text, load_flows

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).resolve().parent / "flows_bad"
HOTLINE = ROOT / "flows" / "hotline.yaml"
EXPECT_RE = re.compile(r"# expect: (?P<line>\d+):(?P<column>\d+): (?P<text>.+)")


def expectations(path: Path) -> list[tuple[int, int, str]]:
    """The leading ``# expect:`` comment lines of a corpus file."""
    found = []
    for line in path.read_text(encoding="utf-8").splitlines():
        match = EXPECT_RE.fullmatch(line)
        if not match:
            break
        found.append((int(match["line"]), int(match["column"]), match["text"]))
    return found


CORPUS_FILES = sorted(CORPUS.glob("*.yaml"))


def test_corpus_is_there() -> None:
    assert len(CORPUS_FILES) >= 30
    for path in CORPUS_FILES:
        assert expectations(path), f"{path.name}: the first line must be '# expect: line:column: message'"


@pytest.mark.parametrize("path", CORPUS_FILES, ids=[p.stem for p in CORPUS_FILES])
def test_broken_flow_is_refused_with_position(path: Path) -> None:
    with pytest.raises(FlowError) as caught:
        load_flow(path)
    problems = caught.value.problems
    assert problems, "a FlowError must name at least one problem"
    for problem in problems:
        assert problem.severity == "error"
        assert str(problem).startswith(f"{path}:{problem.line}:{problem.column}: error: ")
    wanted = expectations(path)
    for line, column, text in wanted:
        hits = [p for p in problems if (p.file, p.line, p.column) == (str(path), line, column) and text in p.message]
        assert hits, f"expected {path.name}:{line}:{column}: ...{text}... but got:\n" + \
            "\n".join(str(p) for p in problems)
    unexpected = [p for p in problems
                  if not any((p.line, p.column) == (line, col) and text in p.message for line, col, text in wanted)]
    assert not unexpected, "diagnostics the corpus file does not expect:\n" + "\n".join(map(str, unexpected))
    assert str(caught.value).splitlines() == [str(p) for p in problems]


def test_position_points_at_the_offending_text() -> None:
    """Spot checks that line:column land on the key or value at fault, not on the node or the file's start."""
    for name, at in [("dangling_on_failure", "on_failure: agent"), ("digit_letter", "a: {next: bye}"),
                     ("set_unknown_language", "language: fr"), ("prompt_line_break", "en: "),
                     ("transfer_not_allowlisted", "destination: sales"), ("unknown_timezone", "timezone: Mars"),
                     ("collect_min_over_max", "max_digits: 4"), ("condition_undefined_hours", "open: weekend"),
                     ("set_value_expression", "intent: "), ("number_not_digits", '"100&101"')]:
        path = CORPUS / f"{name}.yaml"
        ((line, column, _),) = expectations(path)
        text = path.read_text(encoding="utf-8").splitlines()[line - 1]
        assert text[column - 1:].startswith(at), f"{name}: {line}:{column} points at {text[column - 1:]!r}"


# ------------------------------------------------------------------------------------------- the shipped flow
def test_hotline_loads_clean() -> None:
    catalogue, problems = load_catalogue([ROOT / "flows"])
    assert problems == []
    flow = load_flow(HOTLINE, catalogue)
    assert isinstance(flow, Flow)
    assert flow.name == "hotline"
    assert flow.warnings == []
    assert flow.entry in flow.nodes
    assert set(flow.numbers) == {"100", "101", "102"}
    for node in flow.nodes.values():
        for target, _ in node.edges():
            assert target in flow.nodes


def test_load_flows_on_shipped_folder() -> None:
    flows, problems = load_flows([ROOT / "flows"])
    assert problems == []
    assert "hotline" in flows


# ------------------------------------------------------------------------------------------------ lint
HEADER = """\
flow: lint
languages: [en, zh-CN]
entry: m1
destinations:
  operator: {context: ivr-transfer, exten: operator}
nodes:
"""
AGENT = """\
  agent:
    type: transfer
    destination: operator
"""


def menu(node_id: str, to: str, zero: bool = True) -> str:
    zero_option = '      "0": {next: agent}\n' if zero else ""
    return (f"  {node_id}:\n    type: menu\n    prompt: {{en: \"Press 1.\", zh-CN: \"请按1。\"}}\n    options:\n"
            f"      \"1\": {{next: {to}}}\n{zero_option}    on_failure: agent\n")


def warnings_of(text: str) -> list[Problem]:
    flow = load_flow_text(text, "lint.yaml")  # warnings never stop a flow from loading
    assert all(p.severity == "warning" for p in flow.warnings)
    for problem in flow.warnings:
        assert str(problem).startswith(f"lint.yaml:{problem.line}:{problem.column}: warning: ")
    return flow.warnings


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if line.startswith(needle))


def test_menu_four_levels_deep_warns() -> None:
    text = HEADER + menu("m1", "m2") + menu("m2", "m3") + menu("m3", "m4") + menu("m4", "agent") + AGENT
    warnings = warnings_of(text)
    assert len(warnings) == 1
    (warning,) = warnings
    assert f"menu 'm4' is 4 levels deep (keep menus to {MAX_MENU_DEPTH}" in warning.message
    assert (warning.line, warning.column) == (line_of(text, "  m4:"), 3)


def test_menu_three_levels_deep_is_fine() -> None:
    text = HEADER + menu("m1", "m2") + menu("m2", "m3") + menu("m3", "agent") + AGENT
    assert warnings_of(text) == []


def test_depth_counts_the_shortest_way_in() -> None:
    """m4 is also reachable straight from m1 (two levels), so it is not too deep."""
    text = HEADER + menu("m1", "m2").replace('      "0"', '      "2": {next: m4}\n      "0"') + \
        menu("m2", "m3") + menu("m3", "m4") + menu("m4", "agent") + AGENT
    assert warnings_of(text) == []


def test_menu_without_zero_warns() -> None:
    text = HEADER + menu("m1", "m2") + menu("m2", "agent", zero=False) + AGENT
    (warning,) = warnings_of(text)
    assert "menu 'm2' has no '0' option" in warning.message
    assert (warning.line, warning.column) == (line_of(text, "  m2:"), 3)


def long_prompt_flow(en: str, zh: str, all_languages: bool = False) -> str:
    prompt = f'{{all_languages: true, text: {{en: "{en}", zh-CN: "{zh}"}}}}' if all_languages \
        else f'{{en: "{en}", zh-CN: "{zh}"}}'
    return HEADER.replace("entry: m1", "entry: hello") + \
        f"  hello:\n    type: say\n    prompt: {prompt}\n    next: agent\n" + AGENT


def test_long_english_prompt_warns() -> None:
    en = " ".join(["word"] * 40)  # 40 words at 2.5 a second: 16 s
    text = long_prompt_flow(en, "你好。")
    (warning,) = warnings_of(text)
    assert "node 'hello': prompt 'prompt' runs about 16 s (over 15 s)" in warning.message
    assert (warning.line, warning.column) == (line_of(text, "    prompt:"), 5)


def test_long_chinese_prompt_warns() -> None:
    zh = "您好" * 36  # 72 Han characters at 4.5 a second: 16 s
    (warning,) = warnings_of(long_prompt_flow("Hello.", zh))
    assert "runs about 16 s (over 15 s)" in warning.message


def test_prompts_just_under_the_limit_do_not_warn() -> None:
    assert warnings_of(long_prompt_flow(" ".join(["word"] * 37), "您好" * 33)) == []  # 14.8 s and 14.7 s


def test_all_languages_prompt_adds_its_languages_up() -> None:
    """Played one language after the other, 10 s of English and 10 s of Chinese make 20 s."""
    text = long_prompt_flow(" ".join(["word"] * 25), "您好" * 22 + "您", all_languages=True)
    (warning,) = warnings_of(text)
    assert "runs about 20 s" in warning.message


# ------------------------------------------------------------------------------------------- many files
SMALL = """\
flow: {name}
languages: [en]
entry: bye
numbers:
{numbers}
nodes:
  bye:
    type: hangup
"""


def small(name: str, *numbers: str) -> str:
    return SMALL.format(name=name, numbers="\n".join(f'  "{n}": en' for n in numbers) or "  {}")


def test_load_flows_reports_a_flow_name_used_twice(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(small("hotline", "100"), encoding="utf-8")
    (tmp_path / "b.yaml").write_text(small("hotline", "200"), encoding="utf-8")
    flows, problems = load_flows([tmp_path])
    assert list(flows) == ["hotline"]
    assert flows["hotline"].path == str(tmp_path / "a.yaml")
    (problem,) = problems
    assert problem.severity == "error"
    assert problem.file == str(tmp_path / "b.yaml")
    assert f"flow name 'hotline' is also used by {tmp_path / 'a.yaml'}" in problem.message


def test_load_flows_reports_a_number_claimed_twice(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(small("english", "100", "102"), encoding="utf-8")
    (tmp_path / "b.yaml").write_text(small("chinese", "101", "102"), encoding="utf-8")
    flows, problems = load_flows([tmp_path])
    assert list(flows) == ["english"]
    (problem,) = problems
    assert problem.severity == "error"
    assert problem.file == str(tmp_path / "b.yaml")
    assert "number 102 is already answered by flow 'english'" in problem.message


def test_load_flows_skips_yaml_that_is_not_a_flow(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(small("a", "100"), encoding="utf-8")
    (tmp_path / "other.yaml").write_text("voices: {en: en-us}\n", encoding="utf-8")
    flows, problems = load_flows([tmp_path])
    assert list(flows) == ["a"] and problems == []


def test_load_flows_keeps_good_flows_and_reports_bad_ones(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(small("a", "100"), encoding="utf-8")
    (tmp_path / "b.yaml").write_text(small("b", "101").replace("entry: bye", "entry: nowhere"), encoding="utf-8")
    flows, problems = load_flows([tmp_path])
    assert list(flows) == ["a"]
    (problem,) = problems
    assert (problem.file, problem.line, problem.column) == (str(tmp_path / "b.yaml"), 3, 1)
    assert "entry node 'nowhere' does not exist" in problem.message


def test_unreadable_files_are_flow_errors(tmp_path: Path) -> None:
    with pytest.raises(FlowError, match="cannot read file"):
        load_flow(tmp_path / "missing.yaml")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"flow: caf\xe9\n")
    with pytest.raises(FlowError, match="cannot read file") as caught:
        load_flow(latin1)
    assert str(caught.value).startswith(f"{latin1}:1:1: error: ")


# ------------------------------------------------------------------------------------------------- CLI
LOCATED = re.compile(r"^(?P<file>.+\.yaml):(?P<line>\d+):(?P<column>\d+): (?P<severity>error|warning): (?P<msg>.+)$")


def test_cli_check_on_the_corpus_fails_with_positions(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["flows", "check", str(CORPUS)]) == 1
    out = capsys.readouterr().out.splitlines()
    *located, summary = out
    assert located and all(LOCATED.match(line) for line in located), out
    checked = {m["file"] for line in located if (m := LOCATED.match(line))}
    # every corpus file the folder scan picks up (a top-level "flow:" key) is reported, at the expected place
    scanned = [p for p in CORPUS_FILES if re.search(r"(?m)^flow\s*:", p.read_text(encoding="utf-8"))]
    assert checked == {str(p) for p in scanned}
    for path in scanned:
        for line, column, text in expectations(path):
            assert any(row.startswith(f"{path}:{line}:{column}: error: ") and text in row for row in located), \
                f"{path.name}:{line}:{column} {text!r} missing from the output"
    match = re.fullmatch(r"(\d+) file\(s\), 0 flow\(s\) ok, (\d+) error\(s\), 0 warning\(s\)", summary)
    assert match, summary
    assert int(match[1]) == len(scanned) and int(match[2]) == len(located)


def test_cli_check_one_broken_file(capsys: pytest.CaptureFixture[str]) -> None:
    path = CORPUS / "dangling_next.yaml"
    assert main(["flows", "check", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}:9:5: error: node 'start': next 'goodbye' does not exist" in out.splitlines()


def test_cli_check_on_shipped_flows_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["flows", "check", str(ROOT / "flows")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == ["1 file(s), 1 flow(s) ok, 0 error(s), 0 warning(s)"]


def test_cli_check_warnings_do_not_fail(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "lint.yaml"
    path.write_text(HEADER + menu("m1", "agent", zero=False) + AGENT, encoding="utf-8")
    assert main(["flows", "check", str(path)]) == 0
    first, summary = capsys.readouterr().out.splitlines()
    assert first.startswith(f"{path}:7:3: warning: menu 'm1' has no '0' option")
    assert summary == "1 file(s), 1 flow(s) ok, 0 error(s), 1 warning(s)"


def test_cli_check_without_flow_files_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.yaml").write_text("just: settings\n", encoding="utf-8")
    assert main(["flows", "check", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert "no flow files found" in captured.err
    assert captured.out == ""
