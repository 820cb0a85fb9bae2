-- Extend a lease we hold. KEYS[1] lease, KEYS[2] its "wanted" flag; ARGV[1] token, ARGV[2] TTL (ms).
-- Returns -1 when the lease is no longer ours, else 1 if another instance wants it, 0 if not.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return -1
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('EXISTS', KEYS[2])
