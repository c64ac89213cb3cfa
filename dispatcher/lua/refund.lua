-- Give back the credits of a granted (or pending) reservation, once.
-- KEYS[1] grant hash   KEYS[2] reservations hash
-- ARGV[1] idempotency key   ARGV[2] credits   ARGV[3] expire-at (unix seconds)
-- Returns 1 refunded, 0 nothing to refund (never granted, or already refunded), -1 grant missing
-- With the grant missing, the key is marked refunded all the same: a rebuild whose ledger read
-- came before the failure was recorded then does not count it.
local state = redis.call('HGET', KEYS[2], ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 0 then
  if not state then
    redis.call('HSET', KEYS[2], ARGV[1], 'R')
    redis.call('EXPIREAT', KEYS[2], ARGV[3])
  end
  return -1
end
local credits
if state == 'G' then
  credits = tonumber(ARGV[2])
elseif state and string.sub(state, 1, 1) == 'P' then
  credits = tonumber(string.sub(state, 2))
else
  return 0
end
redis.call('HSET', KEYS[2], ARGV[1], 'R')
redis.call('HINCRBY', KEYS[1], 'used', -credits)
return 1
