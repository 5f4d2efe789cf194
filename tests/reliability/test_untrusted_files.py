"""Nothing read from storage or disk is unpickled; the project's own weights are safetensors."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.reliability.harness import REPO

PACKAGES = ("factory", "stages", "filters", "models")
# module.function calls that unpickle (or run code from) what they read
UNPICKLERS = {
    ("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("dill", "load"), ("dill", "loads"),
    ("cloudpickle", "load"), ("cloudpickle", "loads"), ("joblib", "load"), ("pd", "read_pickle"),
    ("pandas", "read_pickle"), ("torch", "jit.load"), ("yaml", "load"), ("yaml", "unsafe_load"),
    ("marshal", "loads"), ("shelve", "open"),
}
UNSAFE_FLAGS = {("allow_pickle", True), ("weights_only", False), ("trust_remote_code", True),
                ("safe_serialization", False), ("use_safetensors", False)}


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    if isinstance(node, ast.Name):
        return node.id
    return "?"


def keyword_value(call: ast.Call, name: str):
    for keyword in call.keywords:
        if keyword.arg == name and isinstance(keyword.value, ast.Constant):
            return keyword.value.value
    return None


def problems_in(source: str, where: str) -> list[str]:
    found = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            if any(name and name.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib") for name in names):
                found.append(f"{where}:{node.lineno}: imports an unpickler")
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        module, _, function = name.partition(".")
        if name.endswith("torch.load") and keyword_value(node, "weights_only") is not True:
            found.append(f"{where}:{node.lineno}: torch.load without weights_only=True")
        elif (module, function) in UNPICKLERS and not (name == "yaml.load" and _safe_loader(node)):
            found.append(f"{where}:{node.lineno}: {name}(...)")
        for flag, bad in UNSAFE_FLAGS:
            if keyword_value(node, flag) is bad and any(k.arg == flag for k in node.keywords):
                found.append(f"{where}:{node.lineno}: {name}(..., {flag}={bad})")
        if name.endswith("torch.save") and where.split("/")[0] in ("models", "stages"):
            found.append(f"{where}:{node.lineno}: torch.save writes a pickle; save weights with safetensors")
    return found


def _safe_loader(call: ast.Call) -> bool:
    loaders = [dotted(k.value) for k in call.keywords if k.arg == "Loader"] + [dotted(a) for a in call.args[1:]]
    return any(loader.endswith(("SafeLoader", "CSafeLoader")) for loader in loaders)


def test_the_scanner_catches_what_it_looks_for():
    bad = """
import pickle
x = pickle.loads(blob)
y = torch.load(path)
z = torch.load(path, weights_only=False)
w = np.load(path, allow_pickle=True)
m = AutoModel.from_pretrained(path, trust_remote_code=True)
model.save_pretrained(path, safe_serialization=False)
c = yaml.load(text)
torch.save(model.state_dict(), "w.pt")
"""
    found = problems_in(bad, "models/bad.py")
    assert len(found) == 10, found
    good = "a = torch.load(p, weights_only=True)\nb = yaml.load(t, Loader=yaml.SafeLoader)\nc = yaml.safe_load(t)\n"
    assert problems_in(good, "models/good.py") == []


def test_no_code_unpickles_or_runs_code_from_what_it_reads():
    found = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            where = path.relative_to(REPO).as_posix()
            found.extend(problems_in(path.read_text(), where))
    assert found == []


def weight_files(folder: Path) -> dict[str, list[str]]:
    kinds: dict[str, list[str]] = {}
    for path in folder.rglob("*"):
        if path.suffix in (".safetensors", ".bin", ".pt", ".pth", ".pkl", ".ckpt"):
            kinds.setdefault(path.suffix, []).append(path.relative_to(folder).as_posix())
    return kinds


@pytest.mark.slow
def test_the_projects_own_checkpoints_are_safetensors(reference_run, workdir, tmp_path):
    """PromptNet (models/promptnet.py, as the demo built it), the CAFE generator G and the
    assistant heads (models/cafe.py, models/assistant.py; models/training/loop.py saves them the same way)."""
    from factory.tiny.cafe import build_tiny_cafe_assistant, build_tiny_cafe_generator, build_tiny_cafe_parts

    promptnet = workdir / "factory-data" / "models" / "tiny-promptnet"
    parts = build_tiny_cafe_parts(tmp_path / "parts")
    generator = Path(build_tiny_cafe_generator(tmp_path / "cafe", parts))
    assistant = Path(build_tiny_cafe_assistant(tmp_path / "cafe", parts))
    for folder in (promptnet, generator, assistant):
        kinds = weight_files(folder)
        assert set(kinds) == {".safetensors"}, f"{folder.name}: {kinds}"
