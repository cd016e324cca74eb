# The two commands of the README. Both install what they need first (idempotent).
.PHONY: serve test lint bench

serve:
	scripts/bootstrap
	.venv/bin/shoal serve $(ARGS)

test:
	scripts/bootstrap --test
	scripts/check

bench:
	scripts/bootstrap --test
	.venv/bin/python -m bench $(ARGS)
