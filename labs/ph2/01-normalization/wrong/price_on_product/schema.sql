-- WRONG: unit_price treated as a property of the product. The same SKU was sold at
-- different prices in different orders, so one price per product loses information
-- (DISTINCT ON keeps one of them and silently drops the rest).

CREATE TABLE customers (
    customer_id    integer PRIMARY KEY,
    customer_email text    NOT NULL UNIQUE,
    customer_name  text    NOT NULL,
    customer_city  text    NOT NULL
);

CREATE TABLE products (
    product_sku  text          PRIMARY KEY,
    product_name text          NOT NULL,
    unit_price   numeric(10,2) NOT NULL CHECK (unit_price >= 0)
);

CREATE TABLE orders (
    order_id    integer PRIMARY KEY,
    order_date  date    NOT NULL,
    customer_id integer NOT NULL REFERENCES customers (customer_id)
);

CREATE TABLE order_lines (
    order_id    integer NOT NULL REFERENCES orders (order_id),
    product_sku text    NOT NULL REFERENCES products (product_sku),
    quantity    integer NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (order_id, product_sku)
);

INSERT INTO customers
SELECT DISTINCT customer_id, customer_email, customer_name, customer_city
FROM orders_denormalized;
INSERT INTO products
SELECT DISTINCT ON (product_sku) product_sku, product_name, unit_price
FROM orders_denormalized ORDER BY product_sku, order_id;
INSERT INTO orders SELECT DISTINCT order_id, order_date, customer_id FROM orders_denormalized;
INSERT INTO order_lines SELECT order_id, product_sku, quantity FROM orders_denormalized;

CREATE VIEW orders_rebuilt AS
SELECT o.order_id, o.order_date, c.customer_id, c.customer_email, c.customer_name,
       c.customer_city, p.product_sku, p.product_name, l.quantity, p.unit_price
FROM order_lines l
JOIN orders    o ON o.order_id    = l.order_id
JOIN customers c ON c.customer_id = o.customer_id
JOIN products  p ON p.product_sku = l.product_sku;
