"""The `sera-ray` command line: exit codes and what it prints."""

import json

from sera_ray.cli import main


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_data_validate_exits_zero_only_when_every_row_is_valid(tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"prompt": "p", "chosen": "a", "rejected": "b"},
            {"prompt": "p", "chosen": "same", "rejected": "same"},
        ],
    )

    good_code = main(["data", "validate", str(good)])
    good_out = capsys.readouterr().out
    bad_code = main(["data", "validate", str(bad)])
    bad_out = capsys.readouterr().out

    assert good_code == 0 and "rows valid: 1" in good_out
    assert bad_code == 1
    assert f"{bad}:2: rejected" in bad_out and "rows valid: 1" in bad_out


def test_train_with_a_bad_override_exits_two_naming_the_key(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("trainer:\n  beta: 0.1\n")

    code = main(["train", "--config", str(config), "trainer.zero_stage=9"])

    assert code == 2
    assert "trainer.zero_stage" in capsys.readouterr().err
