package io.kpg.examples;

import com.google.protobuf.ByteString;
import com.google.protobuf.InvalidProtocolBufferException;
import com.google.protobuf.Struct;
import com.google.protobuf.Value;
import com.google.protobuf.util.JsonFormat;
import com.google.rpc.ErrorInfo;
import dev.kpg.v1.AppendEventsRequest;
import dev.kpg.v1.AppendEventsResponse;
import dev.kpg.v1.DeadLetter;
import dev.kpg.v1.Document;
import dev.kpg.v1.EventData;
import dev.kpg.v1.GetDocumentRequest;
import dev.kpg.v1.ListDeadLettersRequest;
import dev.kpg.v1.ListDeadLettersResponse;
import dev.kpg.v1.ReplyMessage;
import dev.kpg.v1.ReplyStatus;
import dev.kpg.v1.RequestMessage;
import dev.kpg.v1.Saga;
import dev.kpg.v1.SagaStatus;
import dev.kpg.v1.StartSagaRequest;
import dev.kpg.v1.WatchSagaRequest;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.kpg.client.KpgClient;
import io.kpg.client.KpgErrors;
import java.util.Iterator;
import java.util.Objects;
import java.util.concurrent.TimeUnit;

/**
 * The cross-language e2e scenario (clients/SCENARIO.md) for Java: prints {@code ok <step>} after each
 * step and exits 1, with the reason on stderr, at the first deviation.
 *
 * <p>Environment: {@code KPG_TARGET} (gRPC {@code host:port}, plaintext), {@code KPG_RUN_ID} (unique
 * per run), {@code KPG_DLT_ERROR} (the error message of the dead letter seeded in orders.events.DLT).
 */
public final class Scenario {
    private static final String LANG = "java";
    private static final long CALL_DEADLINE_S = 30;
    private static final long WATCH_DEADLINE_S = 60;

    private final KpgClient kpg;
    private final String runId;
    private final String dltError;
    private final String streamId;
    private String position = "";

    /** A difference between what the gateway did and what SCENARIO.md says it does. */
    static final class Deviation extends RuntimeException {
        Deviation(String message) {
            super(message);
        }
    }

    Scenario(KpgClient kpg, String runId, String dltError) {
        this.kpg = kpg;
        this.runId = runId;
        this.dltError = dltError;
        this.streamId = LANG + "-" + runId;
    }

    public static void main(String[] args) {
        String target = requireEnv("KPG_TARGET");
        String runId = requireEnv("KPG_RUN_ID");
        String dltError = requireEnv("KPG_DLT_ERROR");
        String step = "connect";
        try (KpgClient kpg = KpgClient.connect(target)) {
            Scenario scenario = new Scenario(kpg, runId, dltError);
            step = "append";
            scenario.append();
            step = "wrong-expected-version";
            scenario.wrongExpectedVersion();
            step = "read-model";
            scenario.readModel();
            step = "request-reply";
            scenario.requestReply();
            step = "saga";
            scenario.saga();
            step = "dead-letters";
            scenario.deadLetters();
        } catch (Deviation e) {
            exit(step, e.getMessage());
        } catch (StatusRuntimeException e) {
            String reason = KpgErrors.reason(e);
            exit(step, "unexpected " + e.getStatus().getCode() + ": " + e.getStatus().getDescription()
                    + (reason.isEmpty() ? "" : " (reason " + reason + ")"));
        } catch (RuntimeException e) {
            exit(step, e.toString());
        }
    }

    /** Step 1: a new stream with one OrderPlaced event. */
    void append() {
        AppendEventsResponse appended = kpg.events().withDeadlineAfter(CALL_DEADLINE_S, TimeUnit.SECONDS)
                .appendEvents(orderPlaced());
        expect(appended.getFirstVersion() == 1, "first_version " + appended.getFirstVersion() + ", want 1");
        expect(!appended.getPosition().isEmpty(), "empty position");
        position = appended.getPosition();
        ok("append");
    }

    /** Step 2: the same append again fails WRONG_EXPECTED_VERSION with actual = 1. */
    void wrongExpectedVersion() {
        try {
            kpg.events().withDeadlineAfter(CALL_DEADLINE_S, TimeUnit.SECONDS).appendEvents(orderPlaced());
        } catch (StatusRuntimeException e) {
            Status.Code code = e.getStatus().getCode();
            expect(code == Status.Code.FAILED_PRECONDITION, "status " + code + ", want FAILED_PRECONDITION");
            ErrorInfo info = KpgErrors.errorInfo(e)
                    .orElseThrow(() -> new Deviation("no google.rpc.ErrorInfo with domain \"kpg\" in " + e));
            expect(info.getReason().equals("WRONG_EXPECTED_VERSION"), "reason " + info.getReason());
            String actual = info.getMetadataMap().get("actual");
            expect("1".equals(actual), "metadata actual " + actual + ", want 1");
            ok("wrong-expected-version");
            return;
        }
        throw new Deviation("the second append with expected_version 0 succeeded");
    }

    /** Step 3: order_summary has applied the append (read your own write). */
    void readModel() {
        Document doc = kpg.readModels().withDeadlineAfter(CALL_DEADLINE_S, TimeUnit.SECONDS)
                .get(GetDocumentRequest.newBuilder()
                        .setReadModel("order_summary")
                        .setKey(streamId)
                        .setMinPosition(position)
                        .build());
        Struct data = doc.getData();
        expect(field(data, "status").equals(Value.newBuilder().setStringValue("PLACED").build()),
                "data.status " + field(data, "status"));
        expect(field(data, "customer").equals(Value.newBuilder().setStringValue("c-" + LANG).build()),
                "data.customer " + field(data, "customer"));
        expect(field(data, "total").equals(Value.newBuilder().setNumberValue(42).build()),
                "data.total " + field(data, "total"));
        expect(doc.getVersion() == 1, "version " + doc.getVersion() + ", want 1");
        ok("read-model");
    }

    /** Step 4: the inventory responder answers over Kafka. */
    void requestReply() {
        ReplyMessage reply = kpg.requests().withDeadlineAfter(CALL_DEADLINE_S, TimeUnit.SECONDS)
                .request(RequestMessage.newBuilder()
                        .setTopic("inventory.requests")
                        .setPayload(ByteString.copyFromUtf8("{\"sku\": \"apple\"}"))
                        .setTimeoutMs(10_000)
                        .build());
        expect(reply.getStatus() == ReplyStatus.REPLY_STATUS_REPLIED, "status " + reply.getStatus());
        Struct payload = json(reply.getPayload().toStringUtf8(), "reply payload");
        Struct want = json("{\"sku\": \"apple\", \"available\": 12}", "expected payload");
        expect(payload.equals(want), "payload " + reply.getPayload().toStringUtf8());
        ok("request-reply");
    }

    /** Step 5: place_order runs its three steps to COMPLETED. */
    void saga() {
        String sagaId = LANG + "-" + runId;
        Struct input = json("{\"sku\": \"apple\", \"quantity\": 1, \"amount\": 10, \"customer\": \"c-" + LANG + "\"}",
                "saga input");
        kpg.sagas().withDeadlineAfter(CALL_DEADLINE_S, TimeUnit.SECONDS)
                .startSaga(StartSagaRequest.newBuilder()
                        .setSagaType("place_order")
                        .setSagaId(sagaId)
                        .setInput(input)
                        .build());
        Iterator<Saga> changes = kpg.sagas().withDeadlineAfter(WATCH_DEADLINE_S, TimeUnit.SECONDS)
                .watchSaga(WatchSagaRequest.newBuilder().setSagaId(sagaId).build());
        SagaStatus last = SagaStatus.SAGA_STATUS_UNSPECIFIED;
        try {
            while (changes.hasNext()) {
                Saga saga = changes.next();
                last = saga.getStatus();
                if (last == SagaStatus.SAGA_STATUS_COMPLETED) {
                    ok("saga");
                    return;
                }
                expect(last != SagaStatus.SAGA_STATUS_FAILED && last != SagaStatus.SAGA_STATUS_COMPENSATED,
                        "saga " + sagaId + " ended " + last + ": " + saga.getFailureReason());
            }
        } catch (StatusRuntimeException e) {
            if (e.getStatus().getCode() == Status.Code.DEADLINE_EXCEEDED) {
                throw new Deviation("saga " + sagaId + " not COMPLETED after " + WATCH_DEADLINE_S + " s (" + last + ")");
            }
            throw e;
        }
        throw new Deviation("WatchSaga ended with status " + last + ", want SAGA_STATUS_COMPLETED");
    }

    /** Step 6: the seeded dead letter is listed (every page is searched). */
    void deadLetters() {
        String pageToken = "";
        do {
            ListDeadLettersResponse page = kpg.deadLetters().withDeadlineAfter(CALL_DEADLINE_S, TimeUnit.SECONDS)
                    .listDeadLetters(ListDeadLettersRequest.newBuilder()
                            .setDltTopic("orders.events.DLT")
                            .setPageToken(pageToken)
                            .build());
            for (DeadLetter letter : page.getDeadLettersList()) {
                if (letter.getOriginalTopic().equals("orders.events") && letter.getErrorMessage().equals(dltError)) {
                    ok("dead-letters");
                    return;
                }
            }
            pageToken = page.getNextPageToken();
        } while (!pageToken.isEmpty());
        throw new Deviation("no dead letter from orders.events with error_message \"" + dltError + "\"");
    }

    private AppendEventsRequest orderPlaced() {
        return AppendEventsRequest.newBuilder()
                .setCategory("orders")
                .setStreamId(streamId)
                .setExpectedVersion(0)
                .addEvents(EventData.newBuilder()
                        .setType("OrderPlaced")
                        .setContentType("application/json")
                        .setData(ByteString.copyFromUtf8("{\"customer\": \"c-" + LANG + "\", \"total\": 42}")))
                .build();
    }

    private static Value field(Struct struct, String name) {
        return struct.getFieldsOrDefault(name, Value.getDefaultInstance());
    }

    private static Struct json(String text, String what) {
        Struct.Builder struct = Struct.newBuilder();
        try {
            JsonFormat.parser().merge(text, struct);
        } catch (InvalidProtocolBufferException e) {
            throw new Deviation(what + " is not a JSON object: " + text);
        }
        return struct.build();
    }

    private static void expect(boolean condition, String otherwise) {
        if (!condition) {
            throw new Deviation(otherwise);
        }
    }

    private static void ok(String step) {
        System.out.println("ok " + step);
    }

    private static String requireEnv(String name) {
        String value = System.getenv(name);
        if (value == null || value.isEmpty()) {
            System.err.println("Scenario: set " + name + " (see clients/SCENARIO.md)");
            System.exit(2);
        }
        return Objects.requireNonNull(value);
    }

    private static void exit(String step, String message) {
        System.out.flush();
        System.err.println("FAIL " + step + ": " + message);
        System.exit(1);
    }
}
