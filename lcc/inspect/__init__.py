"""Looking at plans: `lcc plan show` (a rank's or a role's view), `lcc plan diff` (two layouts, structured),
`lcc plan export` (ONNX, Perfetto trace, DOT, CSV) and the pictures of `lcc report --plot`. Everything here
reads a typed plan (a compiled folder, or a spec compiled in memory) and never changes it."""
