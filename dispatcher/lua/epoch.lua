-- The grant's rebuild epoch, set first when missing: a rebuild takes it before reading the SQL
-- ledger and proceeds only if it is unchanged then (Redis did not lose its data in between).
-- KEYS[1] epoch key   ARGV[1] a fresh token   ARGV[2] expire-at (unix seconds)
-- Returns the epoch's token
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  redis.call('EXPIREAT', KEYS[1], ARGV[2])
  return ARGV[1]
end
return redis.call('GET', KEYS[1])
