"""The plugin as a user meets it: options and ini keys, usage errors, the header, markers,
the three ways to name a backend, skips and failures of a backend, rerun commands, seeds,
the figures table, pytest-xdist and the public fixtures.

Every test writes files and runs pytest with ``pytester``; the plugin is active
in those runs because it is installed through its ``pytest11`` entry point.
Backends come from ``broken_backends`` beside this file; shapes are small and
positions few, so each run takes well under a second.
"""

from __future__ import annotations

import re
import shlex
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Dict, List

import pytest

from pytest_longctx import SpecError, load_backend
from pytest_longctx.access.registry import BackendLoadError

TESTS_DIR = Path(__file__).parent
SHAPE = "n_layers=2,n_heads=8,n_kv_heads=2,head_dim=64,theta=10000"
DESCRIBED = "2L 8h/2kv d64 rope=default/neox"
CORRECT = "broken_backends:CorrectBackend"


@pytest.fixture
def pytester(pytester: pytest.Pytester) -> pytest.Pytester:
    """pytester with ``broken_backends`` importable in in-process runs."""
    pytester.syspathinsert(TESTS_DIR)
    return pytester


def small(backend: str = CORRECT, positions: str = "4096") -> List[str]:
    return [f"--longctx-backend={backend}", f"--longctx-shape={SHAPE}", f"--longctx-positions={positions}"]


def collected_ids(result: pytest.RunResult) -> List[str]:
    """Node ids listed by ``--collect-only -q``."""
    return [line for line in result.outlines if "::" in line]


def rerun_commands(result: pytest.RunResult) -> List[str]:
    """The commands printed under 'longctx: rerun a failed case alone'."""
    lines = result.outlines
    start = next(i for i, line in enumerate(lines) if "longctx: rerun a failed case alone" in line)
    return [line for line in lines[start + 1:] if line.startswith("pytest ")]


def rerun(pytester: pytest.Pytester, command: str) -> pytest.RunResult:
    """Run a printed rerun command; it must at least be a command pytest accepts."""
    argv = shlex.split(command)
    assert argv[0] == "pytest"
    result = pytester.runpytest(*argv[1:])
    assert result.ret != pytest.ExitCode.USAGE_ERROR, f"{command}\n" + "\n".join(result.errlines)
    return result


def copy_suite(pytester: pytest.Pytester) -> str:
    """The installed suite copied into the test directory, as a project vendoring it would."""
    import pytest_longctx.conformance as conformance

    shutil.copytree(Path(conformance.__file__).parent, pytester.path / "suite",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return "suite"


def comparison_lines(result: pytest.RunResult) -> List[str]:
    return [line for line in result.outlines if line.startswith("attend with ")]


def table_columns(result: pytest.RunResult) -> List[str]:
    """The header of every column of the figures table, '' for a column without one."""
    lines = result.outlines
    sep = next(i for i, line in enumerate(lines) if re.fullmatch(r"-+(  +-+)+", line))
    header = lines[sep - 1].ljust(len(lines[sep]))
    return [header[m.start():m.end()].strip() for m in re.finditer(r"-+", lines[sep])]


# ----------------------------------------------------------------------------- options


def test_ini_key_has_the_effect_of_the_option(pytester: pytest.Pytester) -> None:
    """``longctx_positions = 4096`` in an ini collects the same cases as the option."""
    by_option = collected_ids(pytester.runpytest(*small(positions="4096"), "--co", "-q"))
    pytester.makeini(f"[pytest]\nlongctx_positions = 4096\nlongctx_shape = {SHAPE}\n")
    by_ini = collected_ids(pytester.runpytest(f"--longctx-backend={CORRECT}", "--co", "-q"))
    assert by_ini == by_option
    assert any(i.endswith("-float32-4096]") for i in by_ini)


def test_command_line_wins_over_ini(pytester: pytest.Pytester) -> None:
    """A project's ini sets defaults; one run overrides them without editing it."""
    pytester.makeini(f"[pytest]\nlongctx_positions = 4096\nlongctx_seed = 7\nlongctx_backend = {CORRECT}\n")
    result = pytester.runpytest(*small(positions="2048"), "--longctx-seed=8", "--co")
    result.stdout.fnmatch_lines([f"longctx: backend {CORRECT}* | shape * | positions 2048 | * | seed 8"])
    result.stdout.no_fnmatch_line("*-4096]*")


def test_ini_alone_names_backend_and_seed_in_header(pytester: pytest.Pytester) -> None:
    """A backend configured only in the ini still gets the header that makes the run reproducible."""
    pytester.makeini(f"[pytest]\nlongctx_backend = {CORRECT}\nlongctx_seed = 7\nlongctx_shape = 7b-sim\n")
    result = pytester.runpytest("--co")
    result.stdout.fnmatch_lines([f"longctx: backend {CORRECT}* | shape 7b-sim (*) | positions 4096,8192,16384 "
                                 "| kv as claimed | seed 7"])


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("--longctx-backend=nosuch", "unknown backend 'nosuch'; known: *cpu*numpy*; or give package.module:factory"),
        ("--longctx-positions=4096,abc", "positions item 'abc' is not a whole number*"),
        ("--longctx-positions=999999", "positions 999999 is outside 1..131072"),
        ("--longctx-shape=nope", "shape 'nope' is not a preset (*qwen3-0.6b*), a .toml/.json file or key=value list"),
        ("--longctx-shape=n_layers=0", "inline shape: n_layers=0, but should be a positive integer"),
        ("--longctx-shape=missing.toml", "shape file missing.toml: No such file or directory"),
        ("--longctx-kv-dtype=float8", "kv dtype float8 is not one of float32, float16, *"),
        ("--longctx-backend=numpy[block",
         "backend 'numpy[[]block': options must be closed with ']'; accepted keys: block, threads, native, prepare"),
        ("--longctx-seed=abc", "--longctx-seed='abc': invalid literal *"),
        ("--longctx-seed=-1", "--longctx-seed='-1': should be a non-negative integer"),
        ("--longctx-chunk=0", "--longctx-chunk=0: should be >= 1"),
        ("--longctx-deadline=-5", "--longctx-deadline=-5.0: should be >= 0"),
    ],
    ids=lambda value: value if value.startswith("--") else "",
)
def test_malformed_value_is_a_one_line_usage_error(pytester: pytest.Pytester, option: str, message: str) -> None:
    """A typo stops the run before anything is allocated, saying which value was wrong, every
    one in the same shape: ``ERROR: longctx: what: why``."""
    result = pytester.runpytest(option, "--co")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.errlines if line.strip()]
    assert len(errors) == 1, errors
    result.stderr.fnmatch_lines(["ERROR: longctx: " + message])


@pytest.mark.parametrize("option", ["--longctx-error-factor=-1", "--longctx-memory-allowance=-0.5"])
def test_negative_bar_is_a_usage_error(pytester: pytest.Pytester, option: str) -> None:
    """A bar that cannot mean anything is a typo, refused like the others."""
    result = pytester.runpytest(*small(), option, "--co")
    assert result.ret == pytest.ExitCode.USAGE_ERROR


def test_header_names_backend_shape_positions_seed(pytester: pytest.Pytester) -> None:
    """The header alone is enough to reproduce the run."""
    result = pytester.runpytest(*small(positions="1024,2k"), "--longctx-seed=7", "--co")
    result.stdout.fnmatch_lines([
        f"longctx: backend {CORRECT}* | shape {SHAPE} ({DESCRIBED}) | positions 1024,2048 | kv as claimed | seed 7",
    ])


def test_shape_from_a_toml_file(pytester: pytest.Pytester) -> None:
    """A shape kept in a file, with a nested [rope] table."""
    pytester.makefile(".toml", shape="n_layers = 2\nn_heads = 8\nn_kv_heads = 2\nhead_dim = 64\n"
                                     "[rope]\ntheta = 10000.0\nstyle = 'gptj'\n")
    result = pytester.runpytest(f"--longctx-backend={CORRECT}", "--longctx-shape=shape.toml", "--co")
    result.stdout.fnmatch_lines(["longctx: backend * | shape shape.toml (2L 8h/2kv d64 rope=default/gptj) | *"])


def test_backend_matrix(pytester: pytest.Pytester) -> None:
    """Two ``--longctx-backend`` give every case per backend; one backend's skips leave the other's passes."""
    result = pytester.runpytest(*small(), "--longctx-backend=broken_backends:ClaimsFloat16", "-m", "longctx_limits",
                                "-v")
    outcomes = result.parseoutcomes()
    assert outcomes["passed"] == outcomes["skipped"] >= 1, result.stdout.str()
    result.stdout.fnmatch_lines([
        f"longctx: backend {CORRECT}*, broken_backends:ClaimsFloat16* | shape *",
        f"*[[]{CORRECT}-float32-4096] PASSED*",
        "*[[]broken_backends:ClaimsFloat16-float16-4096] SKIPPED*",
    ])


# ----------------------------------------------------------------------------- markers


def test_markers_are_registered(pytester: pytest.Pytester) -> None:
    """The groups are documented in ``pytest --markers`` (and usable under --strict-markers)."""
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines([
        "@pytest.mark.longctx_limits: context limits*",
        "@pytest.mark.longctx_memory: KV memory*",
        "@pytest.mark.longctx_throughput: fill and retrieve throughput*",
        "@pytest.mark.longctx_equivalence: attention with RoPE matches the float64 reference*",
        "@pytest.mark.longctx_storage_independent: *",
    ])


def test_marker_selects_one_group(pytester: pytest.Pytester) -> None:
    """``-m longctx_limits`` certifies one question without paying for the others."""
    every = collected_ids(pytester.runpytest(*small(), "--co", "-q"))
    result = pytester.runpytest(*small(), "-m", "longctx_limits", "-v")
    limits = [i for i in every if i.startswith("test_limits.py::")]
    assert limits and len(limits) < len(every)
    # The runtime groups are deselected for a KV-cache backend in both runs.
    deselected = result.parseoutcomes()["deselected"]
    assert deselected >= len(every) - len(limits)
    result.assert_outcomes(passed=len(limits), deselected=deselected)
    ran = [line for line in result.outlines if line.endswith("PASSED") or " PASSED " in line]
    assert ran and all(line.startswith("test_limits.py::") for line in ran), ran


# ----------------------------------------------------------------------------- naming a backend


CONFIGURABLE = """
    from broken_backends import CorrectBackend

    class Configurable(CorrectBackend):
        def __init__(self, **options):
            self.options = options
            self.name = "configurable"

    def fails_inside(**options):
        return len(None)  # a TypeError that has nothing to do with the options
"""

USES_OPTIONS = """
    def test_options_reach_the_factory(longctx_backend):
        assert longctx_backend.options == {"block": 16, "fast": True, "mode": "paged", "ratio": 0.5}
"""


def test_conftest_hook_registers_a_backend(pytester: pytest.Pytester) -> None:
    """A conftest's ``pytest_longctx_backends`` names a backend; ``pytest_longctx_record`` sees figures."""
    pytester.makeconftest(f"""
        from broken_backends import CorrectBackend

        def pytest_longctx_backends():
            return {{"mine": CorrectBackend, "mine-by-path": "{CORRECT}"}}

        def pytest_longctx_record(config, nodeid, record):
            print("RECORD", record["backend"], record["check"], record["positions"])
    """)
    result = pytester.runpytest(*small("mine"), "-m", "longctx_memory", "-s")
    outcomes = result.parseoutcomes()
    assert outcomes["passed"] >= 1 and "failed" not in outcomes, result.stdout.str()
    result.stdout.fnmatch_lines(["longctx: backend mine* | shape *", "*RECORD mine KV memory / analytic 4096*"])
    result = pytester.runpytest(*small("mine-by-path"), "-m", "longctx_memory")
    assert set(result.parseoutcomes()) == {"passed", "deselected"}, result.stdout.str()
    result = pytester.runpytest("--longctx-backend=nosuch", "--co")
    result.stderr.fnmatch_lines(["ERROR: longctx: unknown backend 'nosuch'; known: *mine, mine-by-path*"])


def make_distribution(pytester: pytest.Pytester, name: str, entry_points: str) -> Path:
    """An installed distribution: a ``.dist-info`` on sys.path, found by importlib.metadata."""
    site = pytester.mkdir("site")
    info = site / f"{name}-0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    pytester.syspathinsert(site)
    return site


def test_entry_point_registers_a_backend(pytester: pytest.Pytester) -> None:
    """A package registers a name in the ``pytest_longctx.backends`` group; pytest and load_backend see it."""
    make_distribution(pytester, "longctx_demo", f"""
        [pytest_longctx.backends]
        demo = {CORRECT}
    """)
    assert load_backend("demo").name == "correct"
    result = pytester.runpytest(*small("demo"), "-m", "longctx_limits")
    outcomes = result.parseoutcomes()
    assert outcomes["passed"] >= 1 and "failed" not in outcomes, result.stdout.str()
    result.stdout.fnmatch_lines(["longctx: backend demo* | shape *"])


def test_the_built_ins_are_entry_points_of_this_distribution() -> None:
    """Found as a third party's backends are: the access layer holds no list of them."""
    from importlib.metadata import entry_points

    from pytest_longctx.access.registry import ENTRY_POINT_GROUP

    own = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.dist.name == "pytest-longctx"}
    assert {"numpy", "cupy", "onnxruntime", "rkllm", "llamacpp", "torch", "transformers", "openvino",
            "openvino-genai"} <= own


def test_an_installed_npu_backend_joins_the_npu_alias(pytester: pytest.Pytester) -> None:
    """A vendor's class declaring ``device_aliases`` answers ``--longctx-backend=npu``: after the
    built-in there by default (rkllm, absent here), before one that needs options to get there
    (openvino[device=NPU]). A registered module that cannot be imported is no member, and leaves
    the other aliases alone."""
    pytester.makepyfile(vendor_npu="""
        from broken_backends import CorrectBackend

        class VendorNpu(CorrectBackend):
            device_aliases = {"npu": {}}
    """, vendor_broken="raise ImportError('the vendor library is missing')")
    make_distribution(pytester, "longctx_vendor", """
        [pytest_longctx.backends]
        vendor = vendor_npu:VendorNpu
        broken = vendor_broken:Nothing
    """)
    from pytest_longctx.access.registry import _alias_members

    assert [label for label, _, _ in _alias_members("npu")] == ["rkllm", "vendor", "openvino[device=NPU]"]
    assert type(load_backend("npu")).__name__ == "VendorNpu"
    assert load_backend("cpu").name == "numpy"


@pytest.mark.parametrize("name", ["configurable:Configurable", "registered"])
def test_options_in_brackets_reach_the_factory(pytester: pytest.Pytester, name: str) -> None:
    """``NAME[key=value,...]`` gives typed keyword options, by import path and by registered name."""
    pytester.makepyfile(configurable=CONFIGURABLE, test_options=USES_OPTIONS)
    pytester.makeconftest('def pytest_longctx_backends():\n    return {"registered": "configurable:Configurable"}\n')
    result = pytester.runpytest("test_options.py",
                                f"--longctx-backend={name}[block=16, fast=yes, mode=paged, ratio=0.5]")
    result.assert_outcomes(passed=1)


def test_package_module_factory_path(pytester: pytest.Pytester) -> None:
    """A factory deep in a package, named ``package.module:attribute.attribute``."""
    pkg = pytester.mkpydir("inhouse")
    (pkg / "engines.py").write_text(textwrap.dedent("""
        from broken_backends import CorrectBackend

        class Factories:
            @staticmethod
            def float32(**options):
                return CorrectBackend()
    """))
    result = pytester.runpytest(*small("inhouse.engines:Factories.float32"), "-m", "longctx_limits")
    outcomes = result.parseoutcomes()
    assert outcomes["passed"] >= 1 and "failed" not in outcomes, result.stdout.str()


def test_a_module_beside_the_user_is_importable_for_the_load_only(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``module:factory`` finds a module in the working directory, whose path is on sys.path for
    that import only: the session's imports are not changed by it afterwards."""
    (tmp_path / "besideme.py").write_text("from pytest_longctx.backends.numpy_backend import NumpyBackend\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    before = list(sys.path)
    backend = load_backend("besideme:NumpyBackend")
    assert type(backend).__module__ == "pytest_longctx.backends.numpy_backend"
    assert sys.path == before
    monkeypatch.delitem(sys.modules, "besideme")


def test_load_backend_outside_pytest(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain Python process loads a backend with options, as a bench script would."""
    pytester.makepyfile(configurable=CONFIGURABLE)
    monkeypatch.setenv("PYTHONPATH", str(TESTS_DIR))
    code = ("import sys\n"
            "from pytest_longctx import load_backend\n"
            "b = load_backend('configurable:Configurable[block=16,fast=no]')\n"
            "print(b.name, sorted(b.options.items()), b.info().kv_dtypes, 'pytest' in sys.modules)\n")
    result = pytester.run(sys.executable, "-c", code)
    assert result.ret == 0, result.stderr.str()
    result.stdout.fnmatch_lines(["configurable [[]('block', 16), ('fast', False)] ('float32',) False"])


def test_load_backend_with_registered_factories() -> None:
    """Registered factories get typed options; a bad name says what is known."""
    seen: Dict[str, object] = {}

    def factory(**options: object) -> object:
        seen.update(options)
        return load_backend(CORRECT)

    assert load_backend("mine[size=3,scale=0.5,label=x]", {"mine": factory}).name == "correct"
    assert seen == {"size": 3, "scale": 0.5, "label": "x"}
    with pytest.raises(SpecError, match=r"unknown backend 'other'; known: .*mine"):
        load_backend("other", {"mine": factory})
    with pytest.raises(SpecError, match="must not contain ':'"):
        load_backend("mine", {"a:b": factory})


def test_typeerror_inside_factory_is_not_an_options_problem(pytester: pytest.Pytester) -> None:
    """A bug inside a factory must not be reported as a wrong option."""
    pytester.makepyfile(configurable=CONFIGURABLE)
    with pytest.raises(BackendLoadError, match="factory raised TypeError"):
        load_backend("configurable:fails_inside")


# ----------------------------------------------------------------------------- backends that cannot run


def test_not_supported_dtype_is_skipped_with_reason(pytester: pytest.Pytester) -> None:
    """info() claims float16, open_cache refuses it: every case is 'not supported', not failed."""
    result = pytester.runpytest(*small("broken_backends:ClaimsFloat16"), "-m", "longctx_limits", "-rs")
    assert set(result.parseoutcomes()) == {"skipped", "deselected"}, result.stdout.str()
    result.stdout.fnmatch_lines(["SKIPPED [[]*] *: not supported: only float32, not float16"])


def test_unavailable_backend_skips_every_case(pytester: pytest.Pytester) -> None:
    """No device here is not a defect: every case is skipped, each with the reason."""
    result = pytester.runpytest(*small("broken_backends:Unavailable"), "-rs")
    assert set(result.parseoutcomes()) == {"skipped"}, result.stdout.str()
    reasons = [line for line in result.outlines if line.startswith("SKIPPED")]
    assert reasons and all(
        line.endswith("backend 'broken_backends:Unavailable' unavailable: no such device on this machine")
        for line in reasons), reasons


def test_raising_factory_fails_every_case(pytester: pytest.Pytester) -> None:
    """Every case reports the backend and the exception, on one line, without a traceback."""
    result = pytester.runpytest(*small("broken_backends:RaisingFactory"))
    outcomes = result.parseoutcomes()
    assert set(outcomes) == {"errors"} and outcomes["errors"] >= 20, result.stdout.str()
    message = ("backend 'broken_backends:RaisingFactory' could not be loaded: backend "
               "'broken_backends:RaisingFactory' factory raised RuntimeError: driver crashed while initialising")
    assert sum(line == message for line in result.outlines) == outcomes["errors"]
    result.stdout.no_fnmatch_line("E   *")


def test_malformed_or_unknown_backend_option_names_the_accepted_keys() -> None:
    for text, message in (("numpy[bogus=1]", "unexpected keyword argument 'bogus'; accepted keys: block, threads, native, prepare"),
                          ("numpy[block=]", "option 'block=' is not key=value; accepted keys: block, threads, native, prepare")):
        with pytest.raises(SpecError) as info:
            load_backend(text)
        assert message in str(info.value)


# ----------------------------------------------------------------------------- rerun and seed


def test_rerun_command_reproduces_the_failure(pytester: pytest.Pytester) -> None:
    """The printed command reruns the one case, with the same seed: the same figures fail."""
    suite = copy_suite(pytester)
    first = pytester.runpytest(suite, *small("broken_backends:Float16Angles"), "-k",
                               "test_attention_matches_reference")
    first.assert_outcomes(failed=1, deselected=first.parseoutcomes()["deselected"])
    (command,) = rerun_commands(first)
    assert command.startswith("pytest 'suite/test_equivalence.py::test_attention_matches_reference[")
    assert "--longctx-seed=" in command
    again = rerun(pytester, command)
    again.assert_outcomes(failed=1)
    assert comparison_lines(again) == comparison_lines(first) != []


def test_rerun_command_of_the_installed_suite_runs(pytester: pytest.Pytester) -> None:
    """The common way to run the suite (no path) must print a rerun command that works."""
    first = pytester.runpytest(*small("broken_backends:HalfAppliedChunk"), "-m", "longctx_limits")
    (command,) = rerun_commands(first)
    rerun(pytester, command).assert_outcomes(failed=1)


def test_rerun_command_keeps_the_bars(pytester: pytest.Pytester) -> None:
    """A failure against a bar set on the command line must fail again when rerun."""
    suite = copy_suite(pytester)
    first = pytester.runpytest(suite, *small(), "--longctx-fill-floor=1e12", "--longctx-contended-cores=none",
                               "-k", "prefill")
    first.assert_outcomes(failed=1, deselected=first.parseoutcomes()["deselected"])
    (command,) = rerun_commands(first)
    rerun(pytester, command).assert_outcomes(failed=1)


def test_rerun_command_of_an_unloadable_backend_runs(pytester: pytest.Pytester) -> None:
    """A backend that failed to load prints a rerun command pytest accepts."""
    suite = copy_suite(pytester)
    first = pytester.runpytest(suite, *small("broken_backends:RaisingFactory"), "-k", "lengths")
    first.assert_outcomes(errors=1, deselected=first.parseoutcomes()["deselected"])
    (command,) = rerun_commands(first)
    rerun(pytester, command).assert_outcomes(errors=1)


def test_seed_makes_inputs_reproducible(pytester: pytest.Pytester) -> None:
    """Same seed, same equivalence figures to the last digit; another seed, other figures."""
    def figures(seed: int) -> List[str]:
        result = pytester.runpytest(*small("broken_backends:Float16Angles"), f"--longctx-seed={seed}",
                                    "-k", "test_attention_matches_reference")
        result.stdout.fnmatch_lines([f"longctx: backend * | seed {seed}"])
        lines = comparison_lines(result)
        assert lines, result.stdout.str()
        return lines

    assert figures(5) == figures(5)
    assert figures(5) != figures(6)


# ----------------------------------------------------------------------------- the table


def test_table_lists_every_check(pytester: pytest.Pytester) -> None:
    """The table is the run's certificate: one row per check, with the seed."""
    result = pytester.runpytest(*small(), "--longctx-seed=11", "-m", "longctx_memory or longctx_equivalence",
                                "-k", "not rope")
    assert set(result.parseoutcomes()) == {"passed", "deselected"}, result.stdout.str()
    result.stdout.fnmatch_lines([
        "*= longctx figures =*",
        f"shape {SHAPE} ({DESCRIBED}), seed 11",
        "backend * kv dtype * check * 4096*",
    ])
    for check in ("KV memory / analytic", "KV memory growth", "attention error", "read error",
                  "attention window", "attention softcap", "attention scale"):
        result.stdout.fnmatch_lines([f"{CORRECT} * float32 * {check} *"])


def test_every_table_column_has_a_header(pytester: pytest.Pytester) -> None:
    """A figure under a column with no header cannot be read."""
    result = pytester.runpytest(*small(), "-k", "test_attention_matches_reference or window")
    assert "failed" not in result.parseoutcomes()
    columns = table_columns(result)
    assert columns[:3] == ["backend", "kv dtype", "check"]
    assert all(columns), columns


SEED_PROBE = """
    import pytest

    seen = set()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(item, call):
        from pytest_longctx.session.options import settings_key  # imported late: the plugin's own import rewrites it

        report = yield
        report.user_properties.append(("seed_seen", item.config.stash[settings_key].seed))
        return report

    def pytest_runtest_logreport(report):
        seen.update(value for key, value in report.user_properties if key == "seed_seen")

    def pytest_terminal_summary(terminalreporter):
        terminalreporter.write_line(f"SEEDS SEEN {sorted(seen)}")
"""


def test_xdist_workers_figures_reach_the_table(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under ``-n 2`` both workers run cases with the controller's seed, and its table holds them all."""
    pytester.makepyfile(seedprobe=SEED_PROBE)
    monkeypatch.setenv("PYTHONPATH", str(TESTS_DIR))
    result = pytester.runpytest_subprocess(*small(), "-n", "2", "-v", "-p", "seedprobe",
                                           "-m", "longctx_memory or longctx_equivalence", "-k", "not rope",
                                           timeout=120)
    assert set(result.parseoutcomes()) == {"passed"}, result.stdout.str()  # workers deselect, silently
    result.stdout.fnmatch_lines(["*[[]gw0[]]*PASSED*"])
    result.stdout.fnmatch_lines(["*[[]gw1[]]*PASSED*"])
    seed = re.search(r"^longctx: backend .* \| seed (\d+)$", result.stdout.str(), re.M)
    assert seed, result.stdout.str()
    result.stdout.fnmatch_lines(["*= longctx figures =*", f"shape {SHAPE} (*), seed {seed[1]}"])
    checks = [line.split("float32")[1].strip() for line in result.outlines if line.startswith(CORRECT + " ")]
    for check in ("KV memory / analytic", "KV memory growth", "attention error", "read error",
                  "attention window", "attention softcap", "attention scale"):  # from both workers, once each
        assert sum(c.startswith(check) for c in checks) == 1, (check, checks)
    result.stdout.fnmatch_lines([f"SEEDS SEEN [[]{seed[1]}]"])


# ----------------------------------------------------------------------------- the suite and public fixtures


def test_no_path_runs_the_installed_suite(pytester: pytest.Pytester) -> None:
    """``pytest --longctx-backend=X`` in an empty directory certifies X."""
    ids = collected_ids(pytester.runpytest(*small(), "--co", "-q"))
    modules = {i.split("::")[0] for i in ids}
    assert modules >= {"test_limits.py", "test_memory.py", "test_throughput.py", "test_equivalence.py"}


def test_a_path_runs_only_that_path(pytester: pytest.Pytester) -> None:
    """Given a path, the plugin does not add the suite to it."""
    pytester.makepyfile(test_own="def test_own():\n    pass\n")
    result = pytester.runpytest(*small(), "test_own.py")
    result.assert_outcomes(passed=1)


USER_TEST = """
    import numpy as np

    def test_decode_matches_reference(longctx_backend, {extra}longctx_spec, longctx_cache, longctx_inputs,
                                      longctx_reference, longctx_measure):
        k, v = longctx_inputs.kv(256, longctx_spec)
        longctx_cache.append(0, longctx_backend.asarray(k), longctx_backend.asarray(v))
        q = longctx_inputs.q(4, longctx_spec)
        got = longctx_backend.to_numpy(longctx_cache.attend(0, longctx_backend.asarray(q)))
        want = longctx_reference.attend(q, k, v, longctx_spec)
        error = float(np.max(np.abs(got - want)))
        longctx_measure.record("my decode error", error, "max|err|", passed=error < 1e-4)
        assert longctx_cache.length(0) == 256 and error < 1e-4
"""


def test_public_fixtures_in_a_user_test(pytester: pytest.Pytester) -> None:
    """A test of one's own gets the matrix, a fresh cache, inputs, the reference and the table."""
    pytester.makepyfile(test_mine=USER_TEST.format(extra="longctx_kv_dtype, longctx_positions, "))
    result = pytester.runpytest("test_mine.py", *small(positions="1024,2048"), "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines([
        f"test_mine.py::test_decode_matches_reference[[]{CORRECT}-float32-1024] PASSED*",
        f"test_mine.py::test_decode_matches_reference[[]{CORRECT}-float32-2048] PASSED*",
        "*= longctx figures =*",
        f"{CORRECT} * float32 * my decode error * max|err| * max|err|",
    ])


def test_public_fixtures_without_kv_dtype_use_a_claimed_dtype(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_mine=USER_TEST.format(extra=""))
    result = pytester.runpytest("test_mine.py", *small(), "-rs")
    result.assert_outcomes(passed=1)


def test_main_job_in_a_checkout_runs_only_the_suite(pytester: pytest.Pytester) -> None:
    """``pytest --longctx-backend=X`` in a directory whose ini sets ``testpaths`` (this project's
    checkout, or a vendor's) runs the suite and only the suite; plain ``pytest`` there runs the
    directory's own tests, and a path given on the command line is run as given."""
    pytester.makepyprojecttoml('[tool.pytest.ini_options]\ntestpaths = ["own"]\n')
    pytester.mkdir("own").joinpath("test_own.py").write_text("def test_own():\n    pass\n")
    suite = collected_ids(pytester.runpytest(*small(), "--co", "-q"))
    assert suite and not [i for i in suite if "test_own" in i], suite
    modules = {i.split("::")[0].rsplit("/", 1)[-1] for i in suite}
    assert {"test_limits.py", "test_memory.py", "test_throughput.py", "test_equivalence.py"} <= modules
    assert collected_ids(pytester.runpytest("--co", "-q")) == ["own/test_own.py::test_own"]
    given = collected_ids(pytester.runpytest(*small(), "own", "--co", "-q"))
    assert given == ["own/test_own.py::test_own"]


def test_alias_options_meant_for_one_member_do_not_stop_the_others() -> None:
    """npu[shape=...] is RKLLM's option: where no NPU is present the alias is unavailable with
    every member's reason (its cases skip), not a usage error from openvino[device=NPU]; options
    that no member takes are the usage error."""
    from pytest_longctx.errors import BackendUnavailable, SpecError
    from pytest_longctx.access.registry import load_backend

    with pytest.raises(BackendUnavailable, match=r"no npu backend is available \(rkllm: .*openvino\[device=NPU\]: "):
        load_backend("npu[shape=qwen3-0.6b,kv_dtype=float16]")
    with pytest.raises(SpecError, match="does not take these options"):
        load_backend("npu[bogus=1]")
