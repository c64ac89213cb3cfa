-- Raise a grant's notified threshold to at least ARGV[1], only when the grant exists (a missing
-- grant is rebuilt from the ledger, which already holds it).
-- KEYS[1] grant hash   ARGV[1] threshold
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local notified = tonumber(redis.call('HGET', KEYS[1], 'notified') or '0')
local threshold = tonumber(ARGV[1])
if threshold > notified then
  redis.call('HSET', KEYS[1], 'notified', threshold)
  return 1
end
return 0
