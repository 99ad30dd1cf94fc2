"""bench/tier_times.py: tests are matched across a move (same file name, or a unique function name after a
rename), counted in the tier of their folder after, and only where both passed. JUnit files written here."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "tier_times.py"
_spec = importlib.util.spec_from_file_location("tier_times", SCRIPT)
tier_times = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tier_times)


def junit(path: Path, cases: list[tuple[str, str, float, str]]) -> Path:
    body = []
    for classname, name, seconds, outcome in cases:
        inner = {"passed": "", "failure": "<failure message='x'/>", "skipped": "<skipped message='x'/>"}[outcome]
        body.append(f'<testcase classname="{classname}" name="{name}" time="{seconds}">{inner}</testcase>')
    path.write_text(f"<testsuites><testsuite>{''.join(body)}</testsuite></testsuites>", encoding="utf-8")
    return path


def test_matches_moves_and_renames_and_sums_by_tier(tmp_path):
    before = junit(
        tmp_path / "b.xml",
        [
            ("tests.test_loss", "test_pinned", 1.0, "passed"),
            ("tests.test_serve.TestGuards", "test_origin", 2.0, "passed"),
            ("tests.test_nocopy", "test_guard_blocks", 3.0, "passed"),  # renamed file after
            ("tests.test_real_model", "test_generate[a]", 10.0, "passed"),
            ("tests.test_old", "test_gone", 5.0, "passed"),  # not after
            ("tests.test_flaky", "test_failed_before", 1.0, "failure"),
        ],
    )
    after = junit(
        tmp_path / "a.xml",
        [
            ("tests.unit.test_loss", "test_pinned", 1.5, "passed"),
            ("tests.cli.test_serve.TestGuards", "test_origin", 2.0, "passed"),
            ("tests.cli.test_copy_guard", "test_guard_blocks", 2.0, "passed"),
            ("tests.real.test_real_model", "test_generate[a]", 11.0, "passed"),
            ("tests.unit.test_new", "test_new", 9.0, "passed"),
            ("tests.unit.test_flaky", "test_failed_before", 1.0, "passed"),
        ],
    )
    res = tier_times.compare(tier_times.read_junit(before), tier_times.read_junit(after))
    assert res["matched_tests"] == 4
    assert res["tiers"]["unit"] == {"tests": 1, "before_s": 1.0, "after_s": 1.5, "after_over_before": 1.5}
    assert res["tiers"]["cli"]["tests"] == 2 and res["tiers"]["cli"]["before_s"] == 5.0
    assert res["tiers"]["cli"]["after_s"] == 4.0
    assert res["tiers"]["real"]["after_over_before"] == 1.1
    assert res["suite_seconds"] == {"before": 22.0, "after": 26.5}
    assert res["most_slowed"][0]["test"] == "tests.real.test_real_model::test_generate[a]"


def test_a_name_on_several_files_is_not_guessed(tmp_path):
    before = junit(
        tmp_path / "b.xml", [("tests.test_a", "test_x", 1.0, "passed"), ("tests.test_b", "test_x", 1.0, "passed")]
    )
    after = junit(tmp_path / "a.xml", [("tests.unit.test_c", "test_x", 1.0, "passed")])
    assert tier_times.compare(tier_times.read_junit(before), tier_times.read_junit(after))["matched_tests"] == 0
