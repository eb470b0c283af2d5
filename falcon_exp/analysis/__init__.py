"""MLflow -> tidy DataFrames -> comparison tables and paper figures. Reads only MLflow."""

from __future__ import annotations

from pathlib import Path

from falcon_exp import schema
from falcon_exp.analysis import figures, tables
from falcon_exp.analysis.load import Loaded, load


def analyse(uri: str, out: Path, experiment: str = "falcon-exp", sweep: str | None = "latest", filter_string: str = "") -> tuple[Loaded, list[Path]]:
    """Write the comparison table, the tidy data and the figures of the selected runs under `out`."""
    loaded = load(uri, experiment, sweep, filter_string)
    if loaded.runs.empty:
        return loaded, []
    keys = tables.varying(loaded.runs)
    table = tables.comparison(loaded.runs, loaded.samples)
    written = tables.write(table, out)
    flat = out / "results.csv"
    tables.save_csv(tables.results(loaded.runs), flat)
    written.append(flat)
    if schema.ROOFLINE_FRACTION in loaded.runs:
        decode = out / "roofline.csv"
        tables.save_csv(tables.roofline(loaded.runs), decode)
        written.append(decode)
    tidy = out / "runs_by_prompt.csv"
    columns = [c for c in loaded.tidy.columns if c != "start_time"]
    tables.save_csv(loaded.tidy[columns], tidy)
    written.append(tidy)
    written += figures.make_all(loaded.runs, loaded.samples, keys, out)
    return loaded, written
