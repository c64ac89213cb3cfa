-- Give back the credits of a granted reservation, once.
-- KEYS[1] grant hash   KEYS[2] reservations hash   ARGV[1] idempotency key   ARGV[2] credits
-- Returns 1 refunded, 0 nothing to refund (never granted, or already refunded), -1 grant missing
if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
if redis.call('HGET', KEYS[2], ARGV[1]) ~= 'G' then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[1], 'R')
redis.call('HINCRBY', KEYS[1], 'used', -tonumber(ARGV[2]))
return 1
