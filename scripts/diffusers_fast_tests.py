#!/usr/bin/env python
"""Run diffusers' own SD / SDXL / SD3 fast pipeline tests, stock and with asyndm's subclasses.

    python scripts/diffusers_fast_tests.py --diffusers-git /path/to/diffusers.git --ref v0.40.0 \
        [--out docs/diffusers_fast_tests.md]

1. ``git archive <ref> tests`` of the given diffusers repository (bare or not) is unpacked
   into a temporary folder outside this repository (deleted afterwards unless ``--keep``);
   nothing of diffusers' tests is copied into the repo.
2. The test-only packages diffusers' tests import and the installed environment lacks
   (``parameterized``, ``requests-mock``) are installed with pip into ``--deps-dir`` (outside
   the environment, ``--no-deps``) and put on ``PYTHONPATH``.
3. Offline stand-ins for the hub's tiny tokenizers / T5 config are written
   (``scripts/diffusers_fast_tests/standins.py``); ``HF_HUB_OFFLINE=1``.
4. Each test file runs twice under pytest with ``scripts/diffusers_fast_tests/
   asyndm_diffusers_plugin.py``: stock, and with every test class's ``pipeline_class``
   ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` / ``StableDiffusion3Pipeline``
   replaced by ``AsynDMPipeline`` / ``AsynDMXLPipeline`` / ``AsynDMSD3Pipeline`` (this
   repository's ``src`` first on ``PYTHONPATH``).
5. A markdown report (per file: stock and asyndm pass / fail / skip; every test that fails
   with asyndm but passes stock, with its one-line error) goes to ``--out`` (or stdout).

The tests run against the *installed* diffusers; ``--ref`` only chooses the test files.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HELPERS = Path(__file__).resolve().parent / "diffusers_fast_tests"

TEST_FILES = {
    "SD": "tests/pipelines/stable_diffusion/test_stable_diffusion.py",
    "SDXL": "tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py",
    "SD3": "tests/pipelines/stable_diffusion_3/test_pipeline_stable_diffusion_3.py",
}
# import name -> pip requirement, for what diffusers' test modules import beyond the library
TEST_DEPS = {"parameterized": "parameterized", "requests_mock": "requests-mock"}
# diffusers' older (unittest) mixin returns early -- and so passes without running anything --
# when a parameter it needs is not in ``inspect.signature(pipeline_class.__call__)``.
SIGNATURE_GATED = {
    "test_num_images_per_prompt": ("num_images_per_prompt",),
    "test_cfg": ("guidance_scale",),
    "test_callback_inputs": ("callback_on_step_end", "callback_on_step_end_tensor_inputs"),
    "test_callback_cfg": ("callback_on_step_end", "callback_on_step_end_tensor_inputs",
                          "guidance_scale"),
    "test_ip_adapter_cfg": ("guidance_scale",),
}
PINNED_VALUES = re.compile(r"expected slice|Tensors not close|not less than|assert np\.float64|"
                           r"Max diff|allclose", re.IGNORECASE)
HUB_ERRORS = re.compile(
    r"offline mode|LocalEntryNotFound|couldn't connect|Cannot reach|huggingface\.co|"
    r"not fully cached locally|outgoing traffic has been disabled|"
    r"HF_HUB_OFFLINE|is not a local folder and is not a valid model identifier|"
    r"not a valid model identifier|Max retries exceeded|Connection(Error| refused)",
    re.IGNORECASE,
)


def git(git_dir: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", git_dir, *args], check=True, capture_output=True, **kw)


def extract_tests(git_dir: str, ref: str, dest: Path) -> str:
    """Unpack ``<ref>:tests`` into ``dest``; return the commit id."""
    commit = git(git_dir, "rev-parse", f"{ref}^{{commit}}", text=True).stdout.strip()
    data = git(git_dir, "archive", "--format=tar", commit, "tests").stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    return commit


def ensure_deps(deps_dir: Path) -> list[str]:
    """pip-install (``--target``, ``--no-deps``) the test-only packages that are missing."""
    sys.path.insert(0, str(deps_dir))
    missing = [pkg for mod, pkg in TEST_DEPS.items() if importlib.util.find_spec(mod) is None]
    if missing:
        print(f"== pip install --target {deps_dir} --no-deps {' '.join(missing)}", flush=True)
        deps_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                        str(deps_dir), *missing], check=True)
    return missing


def write_standins(dest: Path) -> Path:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(HELPERS)]))
    subprocess.run([sys.executable, str(HELPERS / "standins.py"), str(dest)], check=True,
                   env=env, stdout=subprocess.DEVNULL)
    return dest / "mapping.json"


def run_pytest(work: Path, test_file: str, swap: bool, env: dict, tag: str, timeout: int,
               keyword: str | None) -> dict:
    results = work / "results"
    results.mkdir(exist_ok=True)
    xml = results / f"{tag}.xml"
    log = results / f"{tag}.log"
    swap_log = results / f"{tag}.swap.json"
    cmd = [sys.executable, "-m", "pytest", test_file, "-p", "asyndm_diffusers_plugin",
           "-p", "no:cacheprovider", "-q", "-rN", "--junitxml", str(xml), "-o",
           "junit_family=xunit1"]
    if keyword:
        cmd += ["-k", keyword]
    env = dict(env, ASYNDM_SWAP="1" if swap else "0", ASYNDM_SWAP_LOG=str(swap_log))
    revision = asyndm_revision()
    start = time.time()
    with open(log, "w", encoding="utf-8") as out:
        try:
            proc = subprocess.run(cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    elapsed = time.time() - start
    cases = parse_junit(xml) if xml.exists() else {}
    swap_info = json.loads(swap_log.read_text()) if swap_log.exists() else {}
    tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-3:]
    print(f"   {tag}: rc {rc}, {elapsed:.0f} s, {summary(cases)}", flush=True)
    return {"rc": rc, "seconds": elapsed, "cases": cases, "swap": swap_info, "tail": tail,
            "revision": revision, "revision_after": asyndm_revision()}


def _one_line(text: str | None, limit: int = 240) -> str:
    """The message on one line (its lines joined), at most ``limit`` characters."""
    line = " ".join(part.strip() for part in (text or "").splitlines() if part.strip())
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _asyndm_frame(text: str) -> str:
    """The innermost traceback location inside asyndm's sources, if any."""
    frames = re.findall(r"(src/asyndm/[\w/]+\.py:\d+)(?::\s*in\s+(\w+))?", text or "")
    if not frames:
        frames = re.findall(r"(asyndm/[\w/]+\.py:\d+)(?::\s*in\s+(\w+))?", text or "")
    if not frames:
        return ""
    path, func = frames[-1]
    return path[path.index("asyndm/"):] + (f" ({func})" if func else "")


def parse_junit(xml: Path) -> dict:
    """``{test id: {"status": passed|failed|skipped, "message": one line, "where": ...}}``."""
    cases = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        status, message, where = "passed", "", ""
        for child in case:
            if child.tag in ("failure", "error"):
                status = "failed"
                body = child.text or ""
                message = _one_line(child.get("message")) or _one_line(body)
                where = _asyndm_frame(body)  # (a collection error says "collection failure")
                break
            if child.tag == "skipped":
                status = "skipped"
                message = _one_line(child.get("message"))
        cases[name] = {"status": status, "message": message, "where": where}
    return cases


def counts(cases: dict) -> tuple[int, int, int]:
    s = [c["status"] for c in cases.values()]
    return s.count("passed"), s.count("failed"), s.count("skipped")


def summary(cases: dict) -> str:
    p, f, s = counts(cases)
    return f"{p} passed / {f} failed / {s} skipped"


def _unittest_style(test_id: str, run: dict) -> bool:
    """Whether the test class is one of the older ``unittest`` mixin's (not the pytest one)."""
    return test_id.rpartition("::")[0] in run["swap"].get("unittest_classes", ())


def _short(test_id: str) -> str:
    cls, _, name = test_id.rpartition("::")
    return f"{cls.rsplit('.', 1)[-1]}::{name}"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'")


def versions() -> dict[str, str]:
    code = ("import json, diffusers, transformers, torch; print(json.dumps({'diffusers': "
            "diffusers.__version__, 'transformers': transformers.__version__, 'torch': "
            "torch.__version__}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def asyndm_revision() -> str:
    """This repository's HEAD, plus a digest of any uncommitted change under ``src/``."""
    try:
        head = git(str(REPO), "rev-parse", "--short", "HEAD", text=True).stdout.strip()
        status = git(str(REPO), "status", "--porcelain", "--", "src").stdout
        if not status.strip():
            return head
        digest = hashlib.sha1(status + git(str(REPO), "diff", "HEAD", "--", "src").stdout)
        for line in status.decode(errors="replace").splitlines():
            if line.startswith("??"):
                path = REPO / line[3:].strip()
                files = sorted(path.rglob("*")) if path.is_dir() else [path]
                for f in files:
                    if f.is_file():
                        digest.update(f.read_bytes())
        return f"{head} + uncommitted changes in src/ (digest {digest.hexdigest()[:10]})"
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def report(args, commit: str, vers: dict, runs: dict, deps: list[str], started: str) -> str:
    cmd = shlex.join(["python", "scripts/diffusers_fast_tests.py", *args.argv])
    revisions = []  # asyndm's code as the asyndm runs found it (the stock runs do not import it)
    for file_runs in runs.values():
        run = file_runs["asyndm"]
        for r in (run["revision"], run["revision_after"]):
            if r not in revisions:
                revisions.append(r)
    revisions = revisions or [asyndm_revision()]
    lines = [
        "# diffusers' own fast tests with asyndm's pipeline subclasses",
        "",
        "Generated by `scripts/diffusers_fast_tests.py` (do not edit by hand).",
        "",
        f"- Command: `{cmd}`",
        f"- diffusers test files: `{args.ref}` (commit `{commit[:12]}`) of `{args.diffusers_git}`",
        f"- Installed (the library under test): diffusers {vers['diffusers']}, transformers "
        f"{vers['transformers']}, torch {vers['torch']}; asyndm at `{revisions[0]}`"
        + ("" if len(revisions) == 1 else " **(src/ changed during the run: see each file's "
           "runs below)**"),
        f"- Run: {started}, `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}`, "
        "`HF_HUB_OFFLINE=1`, CPU",
        "- Stand-ins (`scripts/diffusers_fast_tests/standins.py`): "
        "`hf-internal-testing/tiny-random-clip` (CLIP BPE tokenizer, < 1000 ids, length 77) and "
        "`hf-internal-testing/tiny-random-t5` (config d_model 32 / d_ff 37 / 4 heads / 5 layers "
        "/ vocab 1103, random weights, a sentencepiece-free unigram `T5Tokenizer`) are generated "
        "locally; any other hub id fails (offline).",
        "- asyndm run: each test class's `pipeline_class` `StableDiffusionPipeline` / "
        "`StableDiffusionXLPipeline` / `StableDiffusion3Pipeline` is replaced by "
        "`AsynDMPipeline` / `AsynDMXLPipeline` / `AsynDMSD3Pipeline` at collection "
        "(`scripts/diffusers_fast_tests/asyndm_diffusers_plugin.py`); the test bodies are "
        "diffusers' own, unchanged.",
    ]
    if deps:
        lines.append(f"- Test-only packages installed with pip into `{args.deps_dir}`: "
                     + ", ".join(deps))
    if args.keyword:
        lines.append(f"- Selection: `-k {args.keyword}`")
    if vers["diffusers"].split(".")[:2] != args.ref.lstrip("v").split(".")[:2]:
        lines.append(f"- Note: the test files are from `{args.ref}`, the installed diffusers is "
                     f"{vers['diffusers']} (the nearest tag available in the given repository).")
    lines += ["", "## Results", "",
              "| file | tests | stock pass | stock fail | stock skip | asyndm pass | asyndm fail "
              "| asyndm skip | fail only with asyndm | skip only with asyndm | asyndm passes "
              "that ran nothing |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    details = []
    for label, path in TEST_FILES.items():
        if label not in runs:
            continue
        stock, asyn = runs[label]["stock"], runs[label]["asyndm"]
        sp, sf, ss = counts(stock["cases"])
        ap, af, as_ = counts(asyn["cases"])
        only = {t: c for t, c in asyn["cases"].items() if c["status"] == "failed"
                and stock["cases"].get(t, {}).get("status") == "passed"}
        both = sorted(t for t, c in asyn["cases"].items() if c["status"] == "failed"
                      and stock["cases"].get(t, {}).get("status") == "failed")
        fixed = sorted(t for t, c in asyn["cases"].items() if c["status"] == "passed"
                       and stock["cases"].get(t, {}).get("status") == "failed")
        skip_only = {t: c for t, c in asyn["cases"].items() if c["status"] == "skipped"
                     and stock["cases"].get(t, {}).get("status") == "passed"}
        missing = set()
        for params in asyn["swap"].get("missing_parameters", {}).values():
            missing |= set(params)
        vacuous = {}
        for t, c in asyn["cases"].items():
            gate = SIGNATURE_GATED.get(t.rpartition("::")[2].split("[")[0], ())
            absent = [g for g in gate if g in missing]
            if c["status"] == "passed" and absent and _unittest_style(t, asyn):
                vacuous[t] = absent
        n = len(set(stock["cases"]) | set(asyn["cases"]))
        lines.append(f"| `{path.split('/')[-1]}` ({label}) | {n} | {sp} | {sf} | {ss} | {ap} | "
                     f"{af} | {as_} | {len(only)} | {len(skip_only)} | {len(vacuous)} |")
        d = [f"### {label}: `{path}`", ""]
        if len(revisions) > 1:
            changed = ("" if asyn["revision"] == asyn["revision_after"]
                       else f", `{asyn['revision_after']}` at its end")
            d.append(f"- asyndm run: asyndm at `{asyn['revision']}` at its start{changed}")
        for mode, run in (("stock", stock), ("asyndm", asyn)):
            if run["rc"] not in (0, 1):
                tail = _md(" / ".join(run["tail"]))
                d.append(f"- {mode} run: pytest exit `{run['rc']}` ({tail})")
        sw = asyn["swap"].get("swapped", {})
        d.append("- Swapped test classes: " + (", ".join(
            f"`{k.rsplit('.', 1)[-1]}` -> `{v.rsplit('.', 1)[-1]}`" for k, v in sw.items())
            or "**none**"))
        for sub, params in asyn["swap"].get("missing_parameters", {}).items():
            if params and sub in " ".join(sw.values()):
                d.append(f"- `inspect.signature({sub}.__call__)` lacks {len(params)} of the "
                         f"parent's parameters: " + ", ".join(f"`{x}`" for x in params))
        d += ["", f"Fails with asyndm, passes stock ({len(only)}):", ""]
        if only:
            d += ["| test | error | innermost asyndm frame |", "|---|---|---|"]
            d += [f"| `{_short(t)}` | {_md(c['message'])} | {_md(c['where'])} |"
                  for t, c in sorted(only.items())]
        else:
            d.append("none")
        d += ["", f"Skipped with asyndm, passes stock ({len(skip_only)}):", ""]
        if skip_only:
            d += ["| test | skip reason |", "|---|---|"]
            d += [f"| `{_short(t)}` | {_md(c['message'])} |" for t, c in sorted(skip_only.items())]
        else:
            d.append("none")
        d += ["", f"Counted as passed with asyndm but returned early, because a parameter it "
              f"needs is not in the `__call__` signature ({len(vacuous)}):", ""]
        if vacuous:
            d += ["| test | missing from the signature |", "|---|---|"]
            d += [f"| `{_short(t)}` | {', '.join(f'`{x}`' for x in v)} |"
                  for t, v in sorted(vacuous.items())]
        else:
            d.append("none")
        stock_failed = sorted(t for t, c in stock["cases"].items() if c["status"] == "failed")
        d += ["", f"Fail stock ({len(stock_failed)}; {len(both)} of them also with asyndm, "
              f"{len(fixed)} pass with asyndm):", ""]
        if stock_failed:
            d += ["| test | cause | stock error | asyndm |", "|---|---|---|---|"]
            for t in stock_failed:
                c = stock["cases"][t]
                if HUB_ERRORS.search(c["message"]):
                    cause = "needs a hub-only checkpoint"
                elif PINNED_VALUES.search(c["message"]):
                    cause = "differs from values pinned upstream (stand-in tokenizer / version)"
                else:
                    cause = "other"
                a = asyn["cases"].get(t, {})
                d.append(f"| `{_short(t)}` | {cause} | {_md(c['message'])} | "
                         f"{a.get('status', 'not run')} |")
        else:
            d.append("none")
        details += d + [""]
    lines += ["", "Skips are diffusers' own (slow / nightly / accelerator-only tests and the "
              "mixins' opt-outs).", ""] + details
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--diffusers-git", required=True, help="diffusers git repository (bare ok)")
    p.add_argument("--ref", required=True, help="tag / commit whose tests/ to run, e.g. v0.40.0")
    p.add_argument("--out", help="markdown report file (default: print it)")
    p.add_argument("--files", default=",".join(TEST_FILES),
                   help=f"comma-separated subset of {','.join(TEST_FILES)}")
    p.add_argument("-k", dest="keyword", help="pytest -k selection (for quick checks)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per pytest run")
    p.add_argument("--deps-dir",
                   default=str(Path.home() / ".cache/asyndm-diffusers-fast-tests/site"),
                   help="where missing test-only packages are pip-installed (--target)")
    p.add_argument("--workdir", help="extract into this folder (kept) instead of a temp one")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = p.parse_args(argv)
    args.argv = argv
    labels = [x.strip().upper() for x in args.files.split(",") if x.strip()]
    unknown = [x for x in labels if x not in TEST_FILES]
    if unknown:
        p.error(f"unknown --files {unknown}; choose from {list(TEST_FILES)}")

    work = Path(args.workdir).resolve() if args.workdir else Path(
        tempfile.mkdtemp(prefix="asyndm-diffusers-tests-"))
    if work == REPO or REPO in work.parents:
        p.error("the work folder must be outside this repository")
    work.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    try:
        print(f"== extracting {args.ref}:tests into {work}", flush=True)
        commit = extract_tests(args.diffusers_git, args.ref, work)
        deps_dir = Path(args.deps_dir).expanduser()
        deps = ensure_deps(deps_dir)
        print("== writing the hub stand-ins", flush=True)
        mapping = write_standins(work / "standins")
        env = dict(os.environ)
        env.update(
            PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(HELPERS), str(deps_dir)]
                                       + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])),
            HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
            ASYNDM_STANDINS=str(mapping), OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
        )
        vers = versions()
        runs = {}
        for label in labels:
            path = TEST_FILES[label]
            if not (work / path).exists():
                print(f"   {label}: {path} is not in {args.ref}; skipped", flush=True)
                continue
            print(f"== {label}: {path}", flush=True)
            runs[label] = {mode: run_pytest(work, path, mode == "asyndm", env,
                                            f"{label}-{mode}", args.timeout, args.keyword)
                           for mode in ("stock", "asyndm")}
        text = report(args, commit, vers, runs, deps, started)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text, encoding="utf-8")
            print(f"== wrote {args.out}")
        else:
            print(text)
    finally:
        if args.workdir or args.keep:
            print(f"== kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
