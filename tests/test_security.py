"""Security hygiene: what the project loads itself is loaded safely; config values are never executed."""

from __future__ import annotations

import ast

from conftest import REPO

SOURCES = sorted([*(REPO / "megatron_greats").rglob("*.py"), *(REPO / "launch").rglob("*.py")])


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name and isinstance(kw.value, ast.Constant):
            return kw.value.value
    return None


def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _problems(source: str, where: str) -> list:
    """The unsafe loading and code execution in one file's source."""
    problems = []
    for node in ast.walk(ast.parse(source, filename=where)):
        at = f"{where}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            if any(n and n.split(".")[0] in ("pickle", "dill", "cloudpickle", "marshal") for n in names):
                problems.append(f"{at}: imports a pickle module")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name in ("eval", "exec", "compile", "__import__"):
            problems.append(f"{at}: {name}()")
        elif name == "torch.load" and _keyword(node, "weights_only") is not True:
            problems.append(f"{at}: torch.load without weights_only=True")
        elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all"):
            problems.append(f"{at}: {name} (use yaml.safe_load)")
        elif name in ("np.load", "numpy.load") and _keyword(node, "allow_pickle") is not False:
            problems.append(f"{at}: np.load without allow_pickle=False")
    return problems


def test_the_check_sees_each_unsafe_form():
    """The scanner itself: each unsafe line is reported (line by line), its safe form is not."""
    unsafe = ["import pickle", "from dill import loads", "eval(text)", "exec(code)", "torch.load(path)",
              "torch.load(path, weights_only=False)", "yaml.load(text)", "yaml.full_load(text)", "np.load(path)",
              "numpy.load(path, allow_pickle=True)"]
    problems = _problems("\n".join(unsafe), "snippet.py")
    assert [int(p.split(":")[1]) for p in problems] == list(range(1, len(unsafe) + 1)), problems
    safe = ["torch.load(path, weights_only=True)", "yaml.safe_load(text)", "np.load(path, allow_pickle=False)",
            "import json", "model.eval()"]
    assert _problems("\n".join(safe), "snippet.py") == []


def test_loading_is_safe_in_every_source_file():
    assert REPO / "megatron_greats" / "training" / "checkpoint.py" in SOURCES  # the scan reaches the package
    problems = [p for path in SOURCES for p in _problems(path.read_text(), str(path.relative_to(REPO)))]
    assert not problems, "\n".join(problems)


def test_a_config_value_is_data_never_code(tmp_path):
    from megatron_greats.config import load_config

    marker = tmp_path / "executed"
    payloads = [f"!!python/object/apply:os.system ['touch {marker}']", f"__import__('os').system('touch {marker}')"]
    for payload in payloads:
        cfg = load_config(str(REPO / "configs" / "tiny-cpu.yaml"), [f"run_dir={payload}"])
        assert cfg.run_dir == payload  # kept as the literal text
    yaml_file = tmp_path / "evil.yaml"
    yaml_file.write_text(f"run_dir: !!python/object/apply:os.system ['touch {marker}']\n")
    try:
        load_config(str(yaml_file))
    except Exception as e:  # refused as invalid YAML, not run
        assert "not valid YAML" in str(e)
    assert not marker.exists()
