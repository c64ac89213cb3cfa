-- Recreate a vanished grant from the SQL ledger, unless another process already did.
-- KEYS[1] grant hash   KEYS[2] reservations hash
-- ARGV[1] total  ARGV[2] used  ARGV[3] notified  ARGV[4] expire-at (unix seconds)
-- ARGV[5..] idempotency keys the ledger already counts as charged
-- Returns 1 rebuilt, 0 already present
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'total', ARGV[1], 'used', ARGV[2], 'notified', ARGV[3])
redis.call('DEL', KEYS[2])
for i = 5, #ARGV do
  redis.call('HSET', KEYS[2], ARGV[i], 'G')
end
redis.call('EXPIREAT', KEYS[1], ARGV[4])
redis.call('EXPIREAT', KEYS[2], ARGV[4])
return 1
