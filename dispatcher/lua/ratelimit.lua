-- Admit N messages to an SMTP relay only if every sliding window stays within its limit.
-- KEYS[i]  sorted set of the messages admitted in window i (member unique, score = unix seconds)
-- ARGV[1]  now (unix seconds, a float from the application clock; never Redis TIME)
-- ARGV[2]  N, messages wanted (1 <= N <= the smallest limit)
-- ARGV[3]  member prefix, unique per call
-- ARGV[4]  slack (seconds) an entry is kept after it left its window
-- ARGV[3+2i], ARGV[4+2i]  length (seconds) and limit of window i
-- Returns {1} admitted (N entries added to every window), or {0, wait}: nothing admitted, and
-- wait (a string: Lua numbers would be truncated to integers) is the seconds until enough
-- entries have left the tightest window (it may round to 0 at the very edge of a window).
--
-- Calls need not arrive in the order of their clocks: a caller that read its clock a moment
-- before another may run after it. Counting with ZCOUNT from the caller's own now, and trimming
-- only entries older than the window plus the slack, lets such a late call still see every
-- entry of its window, so no window ever holds more than its limit.
local now = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local slack = tonumber(ARGV[4])
local denied, wait = false, 0
for i = 1, #KEYS do
  local window, limit = tonumber(ARGV[3 + 2 * i]), tonumber(ARGV[4 + 2 * i])
  if n > limit then
    return redis.error_reply('N=' .. n .. ' is larger than the limit ' .. limit)
  end
  -- Bounds formatted by hand so they keep every digit, whatever Lua would print.
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', string.format('%.17g', now - window - slack))
  -- An entry admitted at t counts while now - window < t.
  local start = '(' .. string.format('%.17g', now - window)
  local over = redis.call('ZCOUNT', KEYS[i], start, '+inf') + n - limit
  if over > 0 then
    denied = true
    -- The over-th oldest entry of the window must leave before N more fit in it.
    local oldest = redis.call('ZRANGEBYSCORE', KEYS[i], start, '+inf', 'WITHSCORES',
      'LIMIT', over - 1, 1)
    local leaves = tonumber(oldest[2]) + window - now
    if leaves > wait then
      wait = leaves
    end
  end
end
if denied then
  return {0, string.format('%.17g', wait)}
end
for i = 1, #KEYS do
  local window = tonumber(ARGV[3 + 2 * i])
  for j = 1, n do
    -- ARGV[1] verbatim: the score is exactly the caller's timestamp.
    redis.call('ZADD', KEYS[i], ARGV[1], ARGV[3] .. ':' .. j)
  end
  -- Nothing in the key counts once the window and the slack have passed without admissions.
  redis.call('PEXPIRE', KEYS[i], math.ceil((window + slack) * 1000))
end
return {1}
