-- Take a lease if it is free. KEYS[1] lease, KEYS[2] its "wanted" flag; ARGV[1] token, ARGV[2] TTL (ms).
-- Clears the wanted flag on success: it was ours while we waited.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
