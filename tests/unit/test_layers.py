"""The house's dependency rule, checked from the source (README, "Where things live").

Dependencies point inward: the pure core imports nothing of ours but itself; settings, credentials and logs
stand beside it; the adapters (store/, mail/, payments) never import a service or an entry point; the services
never import an entry point; only the entry points (cli/, daemon/, demo/) import testing/, and they run no SQL.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "recharged"

CORE = {"money", "rating", "sms", "balance", "clock", "errors", "states", "words", "cards"}
BESIDE_CORE = {"config", "credentials", "logs", "faults", "audit", "tokens"}
ADAPTERS = {"store", "mail", "payments"}
SERVICES = {
    "accounts",
    "usage",
    "funding",
    "planning",
    "recharge",
    "events",
    "reconcile",
    "verify",
    "history",
    "status",
    "charts",
    "csvfiles",
    "datacheck",
    "views",
    "topups",
    "authorizations",
    "thresholds",
}
ENTRY_POINTS = {"cli", "daemon", "demo", "__main__", "__init__"}
TESTING = {"testing"}

PARTS = {
    "core": CORE,
    "beside the core": BESIDE_CORE,
    "adapters": ADAPTERS,
    "services": SERVICES,
    "entry points": ENTRY_POINTS,
    "testing": TESTING,
}
ALLOWED = {  # which parts each part may import
    "core": {"core"},
    "beside the core": {"core", "beside the core"},
    "adapters": {"core", "beside the core", "adapters"},
    "services": {"core", "beside the core", "adapters", "services"},
    "entry points": {"core", "beside the core", "adapters", "services", "entry points", "testing"},
    "testing": {"core", "testing"},
}


def part_of(top: str) -> str | None:
    return next((name for name, members in PARTS.items() if top in members), None)


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "templates" not in p.parts)


def top_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, top-level part of recharged) for every import of ours in the module, lazy ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = node.module.split(".")
            if names[0] == "recharged":
                if len(names) > 1:
                    found.append((node.lineno, names[1]))
                else:  # from recharged import x
                    found += [(node.lineno, alias.name) for alias in node.names if alias.name != "__version__"]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                names = alias.name.split(".")
                if names[0] == "recharged" and len(names) > 1:
                    found.append((node.lineno, names[1]))
    return found


def test_every_module_belongs_to_a_part():
    orphans = [str(p.relative_to(PACKAGE)) for p in modules() if part_of(top_name(p)) is None]
    assert orphans == [], "modules outside every part of the house (add them to a part in test_layers.py)"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_dependency_rule(path: Path):
    mine = part_of(top_name(path))
    if mine is None:
        pytest.fail(f"{path.relative_to(PACKAGE)} belongs to no part")
    wrong = [
        f"recharged/{path.relative_to(PACKAGE)}:{line} imports recharged.{target} ({part_of(target)}), "
        f"which {mine} may not import"
        for line, target in imports_of(path)
        if part_of(target) not in ALLOWED[mine]
    ]
    assert wrong == []


@pytest.mark.parametrize(
    "path",
    [p for p in modules() if part_of(top_name(p)) == "entry points"],
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_entry_points_run_no_sql(path: Path):
    """SQL belongs to store/ and to the services and mail modules that own its tables (README, "Where things
    live"); cli/, daemon/ and demo/ call those and never build a statement or touch an engine themselves."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    sql = [
        f"recharged/{path.relative_to(PACKAGE)}:{node.lineno} imports {node.module}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sqlalchemy"
    ]
    sql += [
        f"recharged/{path.relative_to(PACKAGE)}:{node.lineno} uses .{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr in {"engine", "exec_driver_sql", "execute", "scalars"}
    ]
    assert sql == []


def test_the_rule_catches_a_service_importing_an_entry_point(tmp_path: Path):
    """The checker itself: an import that breaks the rule is found and named."""
    bad = tmp_path / "bad.py"
    bad.write_text("from recharged.cli.app import App\nfrom recharged.money import Units\n", encoding="utf-8")
    found = imports_of(bad)
    assert found == [(1, "cli"), (2, "money")]
    assert part_of("cli") not in ALLOWED["services"]
    assert part_of("money") in ALLOWED["services"]
