"""The command side: REST writes of payments and refunds into the append-only write store,
and the relay that publishes the transactional outbox to Kafka. It serves no queries."""
