"""The domain: aggregates, their events and rules. Standard library and eventsourcing only."""
