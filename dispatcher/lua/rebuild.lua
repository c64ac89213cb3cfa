-- Recreate a vanished grant from the SQL ledger, unless another process already did.
-- KEYS[1] grant hash   KEYS[2] reservations hash   KEYS[3] rebuild epoch
-- ARGV[1] the epoch taken before the ledger was read
-- ARGV[2] total  ARGV[3] notified  ARGV[4] expire-at (unix seconds)
-- ARGV[5] how many charged keys follow
-- ARGV[6..] the idempotency keys the ledger counts as charged (one credit each), then pairs of
--   (key, credits) the ledger counts as pending: claimed, perhaps granted just before the loss
-- Keys the reservations hash already marks refunded or denied were marked so since the grant
-- vanished (the ledger read may predate that): they are not counted.
-- A changed epoch means Redis lost its data after the ledger was read: reservations may have
-- been granted in between (and lost again) that the read cannot hold; the caller reads again.
-- Returns {1, used} rebuilt, {0, 0} already present, {-1, 0} the read is stale
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0, 0}
end
if redis.call('GET', KEYS[3]) ~= ARGV[1] then
  return {-1, 0}
end
local used = 0
local charged_end = 5 + tonumber(ARGV[5])
local function count(key, mark, n)
  local state = redis.call('HGET', KEYS[2], key)
  if state == 'R' or state == 'D' then
    return
  end
  redis.call('HSET', KEYS[2], key, mark)
  used = used + n
end
for i = 6, charged_end do
  count(ARGV[i], 'G', 1)
end
for i = charged_end + 1, #ARGV, 2 do
  local n = tonumber(ARGV[i + 1])
  count(ARGV[i], 'P' .. n, n)
end
redis.call('HSET', KEYS[1], 'total', ARGV[2], 'used', used, 'notified', ARGV[3])
redis.call('EXPIREAT', KEYS[1], ARGV[4])
redis.call('EXPIREAT', KEYS[2], ARGV[4])
return {1, used}
