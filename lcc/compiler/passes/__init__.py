"""Compiler passes. Each takes the compile state and adds one kind of decision to it; `PASSES` is the
order `compile_plan` runs them in, and the plan records each pass's name and description."""
