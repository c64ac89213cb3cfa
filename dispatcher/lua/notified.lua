-- Raise a grant's notified threshold to at least ARGV[1] once the ledger recorded that notice.
-- A missing grant is not half-created: its rebuild reads the ledger, which already holds the
-- notice. A rebuild may have read the ledger before the notice was committed, though, and
-- write the lower threshold after this call; deleting the grant's rebuild epoch refuses that
-- write, and the rebuild reads the ledger again.
-- KEYS[1] grant hash   KEYS[2] rebuild epoch   ARGV[1] threshold
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[2])
  return 0
end
local notified = tonumber(redis.call('HGET', KEYS[1], 'notified') or '0')
local threshold = tonumber(ARGV[1])
if threshold > notified then
  redis.call('HSET', KEYS[1], 'notified', threshold)
  return 1
end
return 0
