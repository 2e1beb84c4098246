-- An open loop in wrk (Debian's wrk 4.1, LuaJIT) for bench.overload --client wrk: payments
-- due at a fixed rate, each with its own Idempotency-Key, latency counted from when a request
-- was due (not when it was sent), as kessai_cli/loadgen.py counts it. wrk itself is a closed
-- loop; its delay() hook is what makes this one open: each time a connection is free, delay()
-- books the next due time of its thread's schedule and wrk waits until then (never sends
-- early), so a free connection takes the next request due, and one still waiting for an answer
-- takes none.
--
-- Which answer belongs to which due time: the due time (and the time it was sent) travel in
-- the payment's order_ref,
-- which the API's 201 echoes. A refusal does not echo it (the proxy's and the API's refusals
-- are fixed bodies), so refusals are counted, not timed (wrk's own latency histogram, from
-- when each request was sent, covers every answer).
--
-- The payments are balance payments by users u0 ... u<USERS - 1>, the load generator's payers
-- (kessai_cli/loadgen.py), whose wallets bench.overload funds before any run: a payment from a
-- wallet nobody funded would be 402.
--
-- wrk URL -s bench/overload.lua -- KEY RATE SECONDS TIMEOUT PREFIX THREADS USERS
-- prints one line "kessai-overload {json}" at the end; bench/wrk_loop.py reads it.

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } kessai_timespec;
int clock_gettime(int clock_id, kessai_timespec *tp);
]]
local clock = ffi.new("kessai_timespec")
local CLOCK_MONOTONIC = 1

local function now()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, clock)
  return tonumber(clock.tv_sec) + tonumber(clock.tv_nsec) * 1e-9
end

local threads = {}

function setup(thread)
  thread:set("number", #threads)
  table.insert(threads, thread)
end

function init(args)
  key = args[1]
  local threads_count = tonumber(args[6])
  threads_total = threads_count
  users = tonumber(args[7])
  interval = threads_count / tonumber(args[2]) -- seconds between two due times of a thread
  seconds = tonumber(args[3])
  timeout = tonumber(args[4])
  prefix = args[5] .. "-" .. number
  booked = 0       -- due times booked by delay()
  sent = 0         -- requests built (each takes the earliest booked due time)
  answered = 0
  admitted = {}    -- seconds from due to answer, 2xx
  admitted_from_sent = {} -- the same from when each was sent (the server's part, and the network's)
  late = 0         -- answers more than TIMEOUT after their due time
  statuses = {}
  refusals = 0
  with_retry_after = 0
  merchants = 0
  -- The schedule starts half a second from now: wrk sends each connection's first request
  -- without asking delay(), so that one is a probe (GET /healthz, not counted), answered before
  -- the first payment is due.
  start = now() + 0.5
  -- Due times k * interval for k = 0, 1, ... up to SECONDS: those not sent (no connection was
  -- free for them before wrk stopped) are time-outs, as the Python client counts them.
  scheduled = math.floor(seconds / interval) + 1
end

function delay()
  local due = start + booked * interval
  if due > start + seconds then
    return 3600000 -- the schedule is over: send nothing more, answers still come in
  end
  booked = booked + 1
  local wait = due - now()
  if wait <= 0 then
    return 0
  end
  return math.ceil(wait * 1000)
end

function request()
  if sent >= booked then
    return wrk.format("GET", "/healthz")
  end
  local due = start + sent * interval
  local sent_at = now()
  if due > sent_at then
    -- wrk's timers fire on whole milliseconds, at times a fraction of one early: counted from
    -- when it was sent, so the latency from due is never less than from sent.
    due = sent_at
  end
  local n = sent
  sent = sent + 1
  merchants = (merchants % 20) + 1
  -- The threads take the payers in turn: thread t's n-th payment is by u<(n * threads + t) mod
  -- USERS>, with that user's device (as loadgen's: dev-<user number>).
  local user = (n * threads_total + number) % users
  local body = string.format(
    '{"merchant_id":"shop-%d","user_id":"u%d","amount":%d,"currency":"JPY","method":"balance",'
      .. '"order_ref":"wrk-%d-%d"}',
    merchants, user, 100 + (n * 7919) % 49900, math.floor(due * 1e6),
    math.floor(sent_at * 1e6))
  return wrk.format("POST", "/v1/payments", {
    ["Authorization"] = "Bearer " .. key,
    ["Content-Type"] = "application/json",
    ["Idempotency-Key"] = prefix .. "-" .. n,
    ["X-Device-Id"] = "dev-" .. user,
  }, body)
end

function response(status, headers, body)
  local due, sent_at = nil, nil
  if status >= 200 and status < 300 then
    due, sent_at = body:match('"order_ref":"wrk%-(%d+)%-(%d+)"')
    if due == nil then
      return -- a probe's answer
    end
  end
  answered = answered + 1
  statuses[status] = (statuses[status] or 0) + 1
  if due ~= nil then
    local t = now()
    local seconds_taken = t - tonumber(due) / 1e6
    admitted[#admitted + 1] = seconds_taken
    admitted_from_sent[#admitted_from_sent + 1] = t - tonumber(sent_at) / 1e6
    if seconds_taken > timeout then
      late = late + 1
    end
  elseif status >= 500 or status == 429 then
    refusals = refusals + 1
    if headers["Retry-After"] ~= nil or headers["retry-after"] ~= nil then
      with_retry_after = with_retry_after + 1
    end
  end
end

local function json_list(values)
  local parts = {}
  for i, v in ipairs(values) do
    parts[i] = string.format("%.6f", v)
  end
  return "[" .. table.concat(parts, ",") .. "]"
end

function done(summary, latency, requests)
  local admitted_all = {}
  local from_sent_all = {}
  local statuses_all = {}
  local totals = { scheduled = 0, sent = 0, answered = 0, late = 0, refusals = 0, retry = 0 }
  for _, thread in ipairs(threads) do
    for _, v in ipairs(thread:get("admitted")) do
      admitted_all[#admitted_all + 1] = v
    end
    for _, v in ipairs(thread:get("admitted_from_sent")) do
      from_sent_all[#from_sent_all + 1] = v
    end
    for status, count in pairs(thread:get("statuses")) do
      statuses_all[status] = (statuses_all[status] or 0) + count
    end
    totals.scheduled = totals.scheduled + thread:get("scheduled")
    totals.sent = totals.sent + thread:get("sent")
    totals.answered = totals.answered + thread:get("answered")
    totals.late = totals.late + thread:get("late")
    totals.refusals = totals.refusals + thread:get("refusals")
    totals.retry = totals.retry + thread:get("with_retry_after")
  end
  local by_status = {}
  for status, count in pairs(statuses_all) do
    by_status[#by_status + 1] = string.format('"%d":%d', status, count)
  end
  io.write(string.format(
    'kessai-overload {"scheduled":%d,"sent":%d,"answered":%d,"late":%d,"refused":%d,"with_retry_after":%d,'
      .. '"by_status":{%s},"socket_timeouts":%d,"connect_errors":%d,"read_errors":%d,'
      .. '"write_errors":%d,"duration_us":%d,"sent_latency_p50_us":%d,"sent_latency_p99_us":%d,'
      .. '"admitted":%s,"admitted_from_sent":%s}\n',
    totals.scheduled, totals.sent, totals.answered, totals.late, totals.refusals, totals.retry,
    table.concat(by_status, ","), summary.errors.timeout, summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.duration,
    latency:percentile(50), latency:percentile(99), json_list(admitted_all),
    json_list(from_sent_all)))
end
