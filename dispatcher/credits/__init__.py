"""Credits: periods, plans, grants and the Redis ledger, subscriptions, orders, notices, refunds."""
