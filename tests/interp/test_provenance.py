"""Results record their command and model without this machine's folders."""

from __future__ import annotations

from types import SimpleNamespace

from interp.models import EMBEDDED, cache_dir
from interp.provenance import machine_path, model_label, recorded_command


def test_recorded_commands_leave_machine_paths_out():
    argv = ["--out", "/tmp/run", "--cache=/data/c", "--tokens", "1000", "--plots", "experiments/results/x",
            "--save-sae", "~/saes/a", "/srv/extra.txt", "--tune-cache", "rel/cache", "--flag"]
    assert recorded_command("experiments/x.py", argv, placeholder_flags=("cache",)) == (
        "python experiments/x.py --out OUT --cache=CACHE --tokens 1000 --plots experiments/results/x "
        "--save-sae SAVE_SAE PATH --tune-cache TUNE_CACHE --flag")
    # without placeholder flags a relative cache folder stays, as every relative path does
    assert recorded_command("b.py", ["--cache", "rel/cache", "--n", "-3"]) == "python b.py --cache rel/cache --n -3"
    assert machine_path("C:\\data") and machine_path("/x") and not machine_path("x/y") and not machine_path("-3")


def test_the_embedded_models_copy_is_recorded_by_name():
    copy = cache_dir() / "models" / f"{EMBEDDED}-98362432-1796402323"
    assert model_label(SimpleNamespace(config=SimpleNamespace(_name_or_path=str(copy)))) == EMBEDDED
    for name in ("HuggingFaceTB/SmolLM2-135M", "/data/my-model", ""):
        assert model_label(SimpleNamespace(config=SimpleNamespace(_name_or_path=name))) == name
    assert model_label(SimpleNamespace()) == ""
