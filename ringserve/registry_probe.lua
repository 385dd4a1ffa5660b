-- Every prefill group's longest cached prefix of a prompt, in one round trip.
-- KEYS: the prefill groups' block sets. ARGV: hash length in bytes; per group the index (from 0) of
-- its chain, space-separated; then the chains (concatenated hashes, one per block size in use).
-- Returns the prefix lengths in blocks, space-separated.
local width = tonumber(ARGV[1])
local seen = {}  -- per chain: the sorted distinct answers of the groups probed so far
local function has(key, chain, i)
  return redis.call('SISMEMBER', key, string.sub(chain, width * (i - 1) + 1, width * i)) == 1
end
local function longest(key, c)
  local chain = ARGV[3 + c]
  local n = #chain / width
  if n == 0 or not has(key, chain, 1) then return 0 end
  local lo, hi = 1, n + 1  -- block lo is cached, block hi is not (n + 1: past the end)
  -- Groups often hold the same prefix (a system prompt, a shared document): try earlier answers first.
  local s = seen[c] or {}
  seen[c] = s
  local a, b = 1, #s
  while a <= b do
    local m = math.floor((a + b) / 2)
    if has(key, chain, s[m]) then lo, a = s[m], m + 1 else hi, b = s[m], m - 1 end
  end
  if hi - lo > 1 and not has(key, chain, lo + 1) then hi = lo + 1 end
  while hi - lo > 1 do
    local mid = math.floor((lo + hi) / 2)
    if has(key, chain, mid) then lo = mid else hi = mid end
  end
  local at = 1
  while s[at] and s[at] < lo do at = at + 1 end
  if lo > 1 and s[at] ~= lo then table.insert(s, at, lo) end
  return lo
end
local out, g = {}, 1
for c in string.gmatch(ARGV[2], '%d+') do
  out[g] = longest(KEYS[g], tonumber(c))
  g = g + 1
end
return table.concat(out, ' ')
