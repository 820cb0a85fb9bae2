package io.kpg.examples;

import com.google.protobuf.ByteString;
import dev.kpg.v1.AppendEventsRequest;
import dev.kpg.v1.AppendEventsResponse;
import dev.kpg.v1.EventData;
import dev.kpg.v1.EventEnvelope;
import dev.kpg.v1.ReadStreamRequest;
import dev.kpg.v1.ReadStreamResponse;
import io.kpg.client.KpgClient;
import java.util.UUID;
import java.util.concurrent.TimeUnit;

/**
 * A first call: append an {@code OrderPlaced} event to a new {@code orders} stream and read the stream
 * back. Target: the first argument, else {@code KPG_TARGET}, else {@code 127.0.0.1:50051}.
 */
public final class FirstCall {
    private FirstCall() {}

    public static void main(String[] args) {
        String target = args.length > 0 ? args[0] : System.getenv().getOrDefault("KPG_TARGET", "127.0.0.1:50051");
        String streamId = "order-" + UUID.randomUUID();
        try (KpgClient kpg = KpgClient.connect(target)) {
            AppendEventsResponse appended = kpg.events().withDeadlineAfter(30, TimeUnit.SECONDS)
                    .appendEvents(AppendEventsRequest.newBuilder()
                            .setCategory("orders")
                            .setStreamId(streamId)
                            .setExpectedVersion(0) // the stream must not exist yet
                            .addEvents(EventData.newBuilder()
                                    .setType("OrderPlaced")
                                    .setData(ByteString.copyFromUtf8("{\"customer\": \"c-1\", \"total\": 42}")))
                            .build());
            System.out.printf("appended orders/%s version %d at %s%n",
                    streamId, appended.getLastVersion(), appended.getPosition());

            // min_position: wait until the stream index has this append (read your own write).
            ReadStreamResponse read = kpg.events().withDeadlineAfter(30, TimeUnit.SECONDS)
                    .readStream(ReadStreamRequest.newBuilder()
                            .setCategory("orders")
                            .setStreamId(streamId)
                            .setMinPosition(appended.getPosition())
                            .build());
            for (EventEnvelope event : read.getEventsList()) {
                System.out.printf("%d %s %s%n", event.getVersion(), event.getType(), event.getData().toStringUtf8());
            }
        }
    }
}
