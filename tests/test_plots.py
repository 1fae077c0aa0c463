"""The loss curve (PNG and Markdown) from a trainer's log history, and progress bars that stay out of CI logs."""
import io

from persona.plots import loss_curve_markdown, loss_curve_png, loss_points
from persona.progress import progress

HISTORY = [{"loss": 8.0 / step, "learning_rate": 1e-3, "grad_norm": 1.0, "step": step} for step in range(1, 31)] + [
    {"loss": float("nan"), "step": 31}, {"train_runtime": 12.0, "step": 30}]


def test_loss_points_keep_finite_losses_in_step_order():
    points = loss_points(list(reversed(HISTORY)))
    assert [p[0] for p in points] == list(range(1, 31))
    assert points[0] == (1, 8.0, 1e-3)


def test_loss_curve_png_is_a_picture(tmp_path):
    path = loss_curve_png(HISTORY, tmp_path / "loss.png", title="run")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert loss_curve_png([], tmp_path / "empty.png").stat().st_size > 0  # no loss logged: a chart that says so


def test_loss_curve_markdown_thins_to_first_and_last_and_links_the_picture():
    table = loss_curve_markdown(HISTORY, max_rows=5)
    lines = table.splitlines()
    assert lines[0] == "| step | train/loss | learning rate |" and len(lines) == 2 + 5
    assert lines[2].startswith("| 1 | 8.0000 |") and lines[-1].startswith("| 30 | 0.2667 |")
    md = loss_curve_markdown(HISTORY, image_url="http://mlflow/img.png", link_url="http://mlflow/run")
    assert md.startswith("[![loss curve](http://mlflow/img.png)](http://mlflow/run)\n\n| step |")


def test_progress_draws_only_on_a_terminal_and_obeys_tqdm_disable(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert progress(range(3), file=io.StringIO()).disable  # a pipe or a CI log: no bar
    assert not progress(range(3), file=Terminal()).disable
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert progress(range(3), file=Terminal()).disable
