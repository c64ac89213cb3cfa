-- Take N credits from a grant for one idempotency key, all or nothing.
-- KEYS[1] grant hash (total, used, notified)
-- KEYS[2] reservations hash (key -> G granted | D denied | R refunded | P<n> pending)
-- ARGV[1] idempotency key   ARGV[2] credits wanted (N >= 1)   ARGV[3] expire-at (unix seconds)
-- Returns {code, used, total, threshold}
--   code: 1 granted, 0 denied (exhausted), 2 replay of a grant, 3 replay of a denial,
--         4 replay of a refunded grant, -1 grant missing (rebuild from the SQL ledger first)
--   threshold: the highest of 80/85/90/95/100 this reservation reached first, else 0
-- A pending key (P<n>) was counted by a rebuild from the ledger: the key was claimed when Redis
-- lost its data, so its credits may have been granted just before. It is granted now without
-- counting it again, or denied (and its credits uncounted) when the grant cannot hold it.
local grant, res = KEYS[1], KEYS[2]
if redis.call('EXISTS', grant) == 0 then
  return {-1, 0, 0, 0}
end
local total = tonumber(redis.call('HGET', grant, 'total'))
local used = tonumber(redis.call('HGET', grant, 'used'))
local prev = redis.call('HGET', res, ARGV[1])
if prev and string.sub(prev, 1, 1) == 'P' then
  if used > total then
    used = redis.call('HINCRBY', grant, 'used', -tonumber(string.sub(prev, 2)))
    redis.call('HSET', res, ARGV[1], 'D')
    return {0, used, total, 0}
  end
  redis.call('HSET', res, ARGV[1], 'G')
elseif prev then
  local code = 2
  if prev == 'D' then code = 3 elseif prev == 'R' then code = 4 end
  return {code, used, total, 0}
else
  local n = tonumber(ARGV[2])
  if used + n > total then
    redis.call('HSET', res, ARGV[1], 'D')
    redis.call('EXPIREAT', res, ARGV[3])
    return {0, used, total, 0}
  end
  used = redis.call('HINCRBY', grant, 'used', n)
  redis.call('HSET', res, ARGV[1], 'G')
  redis.call('EXPIREAT', res, ARGV[3])
end
local notified = tonumber(redis.call('HGET', grant, 'notified') or '0')
local reached = 0
for _, t in ipairs({100, 95, 90, 85, 80}) do
  if used * 100 >= t * total then
    reached = t
    break
  end
end
if total > 0 and reached > notified then
  redis.call('HSET', grant, 'notified', reached)
  return {1, used, total, reached}
end
return {1, used, total, 0}
