-- Give back one credit per part of a bulk reservation (a campaign's recipients), once each.
-- KEYS[1] grant hash   KEYS[2] reservations hash
-- ARGV[1] bulk key (the campaign's reservation)   ARGV[2..] part keys (recipients' send keys)
-- A part comes back when the bulk reservation is granted and the part was not refunded
-- before, or when a rebuild from the ledger marked the part itself as granted.
-- Returns the number of credits given back, or -1 when the grant is missing.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
local bulk_granted = redis.call('HGET', KEYS[2], ARGV[1]) == 'G'
local back = 0
for i = 2, #ARGV do
  local part = ARGV[i]
  local state = redis.call('HGET', KEYS[2], part)
  if state == 'G' then
    redis.call('HSET', KEYS[2], part, 'R')
    back = back + 1
  elseif state == false and bulk_granted then
    redis.call('HSET', KEYS[2], part, 'R')
    back = back + 1
  end
end
if back > 0 then
  redis.call('HINCRBY', KEYS[1], 'used', -back)
end
return back
