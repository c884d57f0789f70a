"""longrun.py: --resume's messages (issue 27.4): another --output-dir is refused, and a folder
that is not a run folder is called so, not advised to be trained into."""

import pytest

import config
import finetune
import longrun


def error_line(capsys, args):
    """finetune.main's one `error:` line for `args` (no traceback)."""
    with pytest.raises(SystemExit) as e:
        finetune.main(list(map(str, args)))
    message = str(e.value.code)
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out
    assert message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.fixture
def unfinished(tmp_path):
    """A run folder as a run leaves it when stopped before its first checkpoint."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.txt").write_text("Run folder: run\n", encoding="utf-8")
    return run


def test_resume_with_another_output_dir_is_refused(unfinished, tmp_path, capsys):
    other = tmp_path / "other"
    line = error_line(capsys, ["--resume", unfinished, "--output-dir", other])
    assert line == (f"error: --resume {unfinished} goes on in that run's own folder, but "
                    f"--output-dir {other} names another; a resumed run stays where it began: "
                    "drop --output-dir")
    assert not other.exists()
    with pytest.raises(ValueError, match="drop --output-dir"):
        finetune.run(config.TrainConfig(resume=unfinished, output_dir=other))


def test_resume_with_its_own_folder_as_output_dir_goes_on_to_the_folder(unfinished, capsys):
    for same in (unfinished, f"{unfinished}/", unfinished.with_name("run.unfinished")):
        line = error_line(capsys, ["--resume", unfinished, "--output-dir", same])
        assert "holds no checkpoint" in line  # the folder's own fault, not --output-dir's
    assert longrun.same_folder(unfinished, unfinished.parent / "." / "run")


def test_resume_on_a_model_folder_says_it_is_not_a_run_folder(tiny_weights, capsys, tmp_path):
    line = error_line(capsys, ["--resume", tiny_weights])
    assert line == (f"error: --resume {tiny_weights}: not a run folder (a run folder of "
                    "finetune.py holds log.txt, and while unfinished checkpoint.pt); it holds "
                    f"a model: to train from it, pass --weights {tiny_weights} and a new "
                    "--output-dir")
    assert "--output-dir " + str(tiny_weights) not in line  # never: train into the model
    empty = tmp_path / "empty"
    empty.mkdir()
    assert error_line(capsys, ["--resume", empty]).endswith(
        "not a run folder (a run folder of finetune.py holds log.txt, and while unfinished "
        "checkpoint.pt); pass the folder of the run to go on with")
