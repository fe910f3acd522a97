"""The official ESFT expert config; its format is defined once, in the Rust core.

``{"experts": {"<layer>": [ids]}, "shared_experts": bool, "non_expert_modules": bool}``
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from esft_rs import _core
from esft_rs.errors import EsftValueError, InvalidFileError
from esft_rs.files.inputs import describe_text_problem, read_text
from esft_rs.files.outputs import Kind, read_by, write_file


@dataclass(frozen=True)
class ExpertConfig:
    experts: dict[int, list[int]] = field(default_factory=dict)
    shared_experts: bool = False
    non_expert_modules: bool = False

    def __post_init__(self) -> None:
        """The checks a parsed file gets (``_core.parse_expert_config``), for a config built
        in Python: an expert listed twice in a layer is refused."""
        for layer, ids in self.experts.items():
            if len(set(ids)) != len(ids):
                twice = next(e for i, e in enumerate(ids) if e in ids[:i])
                raise EsftValueError(f"expert config: layer {layer}: expert {twice} listed"
                                     " twice")

    @classmethod
    def parse(cls, text: str, origin: str | os.PathLike[str] = "<expert config>") -> ExpertConfig:
        if (why := describe_text_problem(text)) is not None:
            raise InvalidFileError(f"{os.fspath(origin)}: not valid Unicode: {why}")
        experts, shared, non_expert = _core.parse_expert_config(text, os.fspath(origin))
        return cls(experts, shared, non_expert)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ExpertConfig:
        return cls.parse(read_text(path), path)

    def to_json(self) -> str:
        return _core.dump_expert_config(self.experts, self.shared_experts, self.non_expert_modules)

    def save(self, path: str | os.PathLike[str]) -> None:
        write_file(path, self.to_json() + "\n")

    @property
    def num_experts(self) -> int:
        return sum(len(v) for v in self.experts.values())


#: An expert config as an output (``esft_rs.files.outputs.check_target``).
OUTPUT_KIND = Kind("an expert config", read_by(ExpertConfig.load))
