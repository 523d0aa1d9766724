"""Executing compiled plans on torch.distributed. Reads plan folders; never imports the compiler."""
