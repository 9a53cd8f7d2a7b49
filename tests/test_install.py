"""A regular install works: the wheel built from this tree, installed outside it, imports and trains.

The editable install that `make setup` does reads the source tree, so a package missing from
setup.py goes unseen there; only a wheel shows it (memo.attention and memo.parallel were once left
out, and `import memo` failed from the wheel with ModuleNotFoundError).

How it runs, offline:
- the sources (setup.py, memo/, planner/, integrations/, csrc/) are copied to a build directory
  outside the checkout and the wheel is built there with `pip wheel --no-deps --no-build-isolation`,
  so torch comes from this environment and nothing is downloaded;
- compiling memo._C takes 1 to 4 minutes on 2 shared cores, so that build directory is fixed
  (in the temporary directory, one per checkout and user) and kept between runs: torch's ninja
  build then recompiles only the C++ sources that changed, and a run after the first takes about
  half a minute. Copies keep their sources' times, so an unchanged source is not rebuilt. (Seeding
  the build with the extension `make setup` built does not work: BuildExtension forces build_ext
  and leaves it to ninja, which needs its own objects.) MEMO_TEST_WHEEL_CLEAN=1 starts from an
  empty build directory;
- the wheel is installed with `pip install --target` into a fresh directory outside the checkout,
  and a child `python -S` (no site: the editable install's .pth hook is never loaded) with that
  directory and this environment's site-packages on its path imports every module of the
  installed memo and trains one wrapped step.
"""

import fcntl
import glob
import hashlib
import json
import os
import pkgutil
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ["setup.py", "memo", "planner", "integrations", "csrc"]


def _build_dir():
    """The kept build directory of this checkout (see the module docstring)."""
    tag = hashlib.sha1(REPO.encode()).hexdigest()[:10]
    return os.path.join(tempfile.gettempdir(), f"memo-wheel-test-{os.getuid()}-{tag}")


def _copy_sources(dst):
    """Replace dst's sources by this tree's; keep dst/build/temp.* (ninja's objects), drop the rest
    of dst/build, where a module deleted here would otherwise linger and reach the wheel."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.egg-info")
    for name in SOURCES:
        src, out = os.path.join(REPO, name), os.path.join(dst, name)
        if os.path.isdir(out):
            shutil.rmtree(out)
        if os.path.isdir(src):
            shutil.copytree(src, out, ignore=ignore)
        else:
            shutil.copy2(src, out)
    for stale in glob.glob(os.path.join(dst, "build", "*")) + glob.glob(os.path.join(dst, "*.egg-info")):
        if not os.path.basename(stale).startswith("temp."):
            shutil.rmtree(stale)


def _run(cmd, cwd, env=None, timeout=600):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out


CHILD = textwrap.dedent("""
    import importlib, json, os, pkgutil, sys
    import memo
    repo = os.path.realpath(sys.argv[1])
    here = os.path.realpath(memo.__file__)
    assert not here.startswith(repo + os.sep), f"memo imported from the checkout: {here}"
    assert not any("editable" in type(f).__name__.lower() or "editable" in repr(f).lower()
                   for f in sys.meta_path), sys.meta_path
    modules = []
    for info in pkgutil.walk_packages(memo.__path__, "memo."):
        importlib.import_module(info.name)
        modules.append(info.name)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, use_cache=False, attn_implementation="sdpa")
    model = memo.wrap(LlamaForCausalLM(cfg), memo.MemoConfig(swap_ratio=0.5))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 128, (1, 128))
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    moved = sum(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    print(json.dumps({"file": here, "modules": modules, "loss": loss.item(), "moved": moved,
                      "n_params": len(before), "csrc": memo.backend_info()["csrc"]}))
""")


def _source_modules(root):
    """Every module of the source tree at root under the name it installs as (planner/ as
    memo.planner...), from the files alone (memo._C is checked on its own)."""
    names = set()
    for pkg, where in (("memo", "memo"), ("memo.planner", "planner"), ("memo.integrations", "integrations")):
        base = os.path.join(root, where)
        for dirpath, dirnames, filenames in os.walk(base):
            if "__init__.py" not in filenames:
                dirnames[:] = []
                continue
            rel = os.path.relpath(dirpath, base)
            prefix = pkg if rel == "." else pkg + "." + rel.replace(os.sep, ".")
            names.add(prefix)
            names.update(f"{prefix}.{f[:-3]}" for f in filenames if f.endswith(".py") and f != "__init__.py")
    return names


def test_wheel_installs_outside_the_checkout_and_trains(tmp_path):
    src, target, wheels = _build_dir(), tmp_path / "site", tmp_path / "wheels"
    if os.environ.get("MEMO_TEST_WHEEL_CLEAN") == "1" and os.path.isdir(src):
        shutil.rmtree(src)
    os.makedirs(src, exist_ok=True)
    with open(os.path.join(src, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)      # two test runs at once share the build directory
        _copy_sources(src)
        expected = _source_modules(src)
        _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
              "-w", str(wheels), src], cwd=str(tmp_path))
    (wheel,) = glob.glob(str(wheels / "memo-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for pkg in ("memo", "memo/attention", "memo/parallel", "memo/swap", "memo/cli", "memo/planner",
                "memo/integrations"):
        assert f"{pkg}/__init__.py" in names, f"{pkg} missing from the wheel: {sorted(names)}"
    assert any(n.startswith("memo/_C.") and n.endswith(".so") for n in names), "memo._C missing from the wheel"

    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target),
          wheel], cwd=str(tmp_path))
    site = sysconfig.get_paths()["purelib"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = os.pathsep.join([str(target), site])
    out = _run([sys.executable, "-S", "-c", CHILD, REPO], cwd=str(tmp_path), env=env)
    got = json.loads(out.stdout.strip().splitlines()[-1])

    assert got["file"].startswith(os.path.realpath(str(target))), got["file"]
    # Every module of the source tree is in the installed package and imports.
    expected.discard("memo")
    assert expected <= set(got["modules"]), f"not installed: {sorted(expected - set(got['modules']))}"
    assert got["csrc"]["loaded"] and got["csrc"]["path"].startswith(os.path.realpath(str(target))), got["csrc"]
    assert got["moved"] == got["n_params"], got
    assert 3.0 < got["loss"] < 6.0, got   # ln(128) = 4.85 at initialisation
