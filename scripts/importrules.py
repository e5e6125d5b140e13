"""An import-linter contract type: the only modules a package may import (an allow-list).

`lint-imports` loads it from the repository root (pyproject.toml, `contract_types`).
Forbidden contracts name what may not be imported; this one names what may, so a new
`import sqlite3` (or a new third-party library, or a shell module of the project) in a
module of `source_modules` breaks the contract without anyone having listed it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from importlinter import Contract, ContractCheck, fields, output

if TYPE_CHECKING:
    from grimp import ImportGraph


class AllowListContract(Contract):
    """`source_modules` (packages) import only `allowed_modules` and each other.

    Options:
        source_modules: packages whose modules are checked.
        allowed_modules: top-level external names (`json`, `re`) or project modules and
            packages (`vpsrelay.errors`) they may import.
    """

    type_name = "allowlist"

    source_modules = fields.ListField(subfield=fields.StringField())
    allowed_modules = fields.ListField(subfield=fields.StringField())

    def check(self, graph: ImportGraph, verbose: bool) -> ContractCheck:
        sources = list(self.source_modules)  # type: ignore[call-overload]
        allowed = set(self.allowed_modules)  # type: ignore[call-overload]

        def permitted(imported: str) -> bool:
            if any(imported == s or imported.startswith(f"{s}.") for s in sources):
                return True
            return any(imported == a or imported.startswith(f"{a}.") for a in allowed)

        refused: list[tuple[str, str, int | None]] = []
        for source in sources:
            for module in sorted(graph.find_descendants(source) | {source}):
                for imported in sorted(graph.find_modules_directly_imported_by(module)):
                    if permitted(imported):
                        continue
                    details = graph.get_import_details(importer=module, imported=imported)
                    line = details[0]["line_number"] if details else None
                    refused.append((module, imported, line))
        return ContractCheck(kept=not refused, metadata={"refused": refused})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for module, imported, line in check.metadata["refused"]:
            where = f"{module} (l.{line})" if line is not None else module
            output.print_error(f"{where} imports {imported}, which is not on the allow-list")
            output.new_line()
