"""Operator commands that talk to a running gateway over gRPC, as any client does (`kpg dlt ...`)."""
