"""Prompt files read and validated as data: a YAML list (or {prompts: [...]}) or JSON lines with a
"prompt" field; every prompt a non-empty string of valid Unicode, named by where it stands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from falcon_exp.errors import ConfigError


def check_prompt(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}={value!r} is not a prompt; each prompt must be a non-empty string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:  # a lone surrogate, which JSON's \ud800 escapes can make
        raise ConfigError(f"{where} is not valid Unicode text: {value[error.start]!r} at character {error.start} is half of a "
                          "surrogate pair; write the character itself or its full pair") from None
    return value


def read_prompts_file(path: Path) -> list[str]:
    """A YAML list of strings (or {prompts: [...]}), or JSON lines with a "prompt" field; data only."""
    if path.is_dir() or not path.exists():
        raise ConfigError(f"prompts.file={str(path)!r} is not a file; give a .yaml, .yml or .jsonl file of prompts")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"prompts.file={str(path)!r} is not UTF-8 text (byte {error.start}); save it as UTF-8") from None
    if path.suffix == ".jsonl":
        items = [_json_line(path, number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    elif path.suffix in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"prompts.file={str(path)!r} is malformed: {str(error).splitlines()[0]}") from None
        items = data.get("prompts") if isinstance(data, dict) else data
    else:
        raise ConfigError(f"prompts.file={str(path)!r} has an unknown suffix; allowed: .yaml, .yml, .jsonl")
    if not isinstance(items, list) or not items:
        raise ConfigError(
            f"prompts.file={str(path)!r} holds no prompts; write a YAML list of strings or JSON lines with a \"prompt\" field"
        )
    return [check_prompt(p, f"prompts.file={str(path)!r} entry {i}") for i, p in enumerate(items)]


def _json_line(path: Path, number: int, line: str) -> Any:
    """A JSON-lines file's prompt, or None where the line holds no "prompt" field."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise ConfigError(f"prompts.file={str(path)!r} is malformed: line {number}: {error.msg} (column {error.colno})") from None
    return row.get("prompt") if isinstance(row, dict) else None
