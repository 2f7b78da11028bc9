"""Reference model zoo: seeded factories returning ``(model, example_inputs[, EvalData])``."""
