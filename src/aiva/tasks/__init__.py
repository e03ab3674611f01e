"""The task pool (issue #6): a queue of commands run in warm sandboxes, with gates,
budgets and evaluation. See docs/TASKS.md."""
