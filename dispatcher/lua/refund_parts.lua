-- Give back one credit per part of a bulk reservation (a campaign's recipients), once each.
-- KEYS[1] grant hash   KEYS[2] reservations hash
-- ARGV[1] expire-at (unix seconds)   ARGV[2] bulk key (the campaign's reservation)
-- ARGV[3..] part keys (recipients' send keys)
-- A part comes back when the bulk reservation is granted (or pending after a rebuild) and the
-- part was not refunded before, or when a rebuild from the ledger marked the part itself as
-- granted. A pending bulk reservation whose parts come back counts as granted from then on: its
-- credits are accounted part by part.
-- Returns the number of credits given back, or -1 when the grant is missing (the parts and the
-- bulk key are then marked refunded, so a rebuild whose ledger read came before their failure
-- does not count them).
if redis.call('EXISTS', KEYS[1]) == 0 then
  for i = 2, #ARGV do
    redis.call('HSETNX', KEYS[2], ARGV[i], 'R')
  end
  redis.call('EXPIREAT', KEYS[2], ARGV[1])
  return -1
end
local bulk = redis.call('HGET', KEYS[2], ARGV[2])
if bulk and string.sub(bulk, 1, 1) == 'P' then
  redis.call('HSET', KEYS[2], ARGV[2], 'G')
  bulk = 'G'
end
local bulk_granted = bulk == 'G'
local back = 0
for i = 3, #ARGV do
  local part = ARGV[i]
  local state = redis.call('HGET', KEYS[2], part)
  if state == 'G' or (state and string.sub(state, 1, 1) == 'P') then
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
