"""The codec benchmark's text: calibration text never holds an evaluation docstring."""

from splitnet.bench.data.stdlib_docs import load_doc_task


def test_calibration_text_is_disjoint_from_the_evaluation_docstrings():
    task = load_doc_task()
    held_out = set(task.eval_text)
    assert len(held_out) == 3000 and len(task.classes) == 30
    calibration = task.calibration_text(n_code=len(task.code_chunks))
    assert not held_out & set(calibration)
    # the extra calibration docstrings come from packages outside the task's classes
    assert task.other_text and not set(task.other_text) & (held_out | set(task.train_text))
    assert len(calibration) == len(task.train_text) + len(task.other_text) + len(task.code_chunks)
